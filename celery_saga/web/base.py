"""What every page and API handler of the web view shares: the request's edge checks, errors, and filters.

What a request brings (query arguments, ids in the path, headers) is read
here, at the edge. An error body echoes it escaped, and never in the HTTP
reason phrase: Tornado up to 6.4 wrote the reason into its error page
unescaped.
"""

from __future__ import annotations

import base64
import hmac
import json
from datetime import UTC, datetime, timedelta
from http.client import responses
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import tornado.web
from celery import Celery
from tornado.escape import xhtml_escape
from tornado.log import app_log

from .. import admin
from ..errors import SagaError, SagaStoreUnavailable
from ..search import where_pairs
from .settings import WebSettings

__all__ = ["BaseHandler", "Refused", "business_keys", "saga_url", "time_filter"]

TEMPLATES = Path(__file__).parent / "templates"
# Pages need nothing but their own inline styles and forms; no page may frame them (the action buttons).
CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"


class Refused(tornado.web.HTTPError):
    """An error answer whose message (it may hold what the request sent) goes into the body, escaped.

    The HTTP reason phrase stays the standard one for the status.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code)
        self.text = message


class BaseHandler(tornado.web.RequestHandler):
    """A page or API handler of the web view: its settings, security headers, access check and error bodies."""

    #: Errors as JSON (the API), or as a line of escaped text (pages).
    api = False

    def initialize(self, celery_app: Celery, web: WebSettings) -> None:
        self.celery_app, self.web = celery_app, web

    def set_default_headers(self) -> None:
        # Set again on error answers (send_error clears the others).
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("Referrer-Policy", "same-origin")

    def prepare(self) -> None:
        if self.web.credentials and not self._authenticated():
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="celery saga", charset="UTF-8"')
            self.finish("authentication required\n")

    def _authenticated(self) -> bool:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(token.strip(), validate=True)
        except ValueError:  # not base64, or not ASCII at all
            return False
        # Bytes, so any UTF-8 password compares (str compare_digest takes ASCII only);
        # every pair is compared, so the time taken does not say which one matched.
        matched = False
        for pair in self.web.credentials:
            matched |= hmac.compare_digest(given, pair)
        return matched

    def check_xsrf_cookie(self) -> None:
        """A POST must come from this site's own pages: its Origin and Referer, then the double-submit token.

        The token alone is only as good as the cookie: the cookie is
        ``SameSite=Strict`` and ``HttpOnly`` (`make_app`), and a browser says
        where a POST comes from in ``Origin`` (and ``Referer``). A client that
        sends neither (curl) still needs the token and its cookie.
        """
        for header in ("Origin", "Referer"):
            value = self.request.headers.get(header)
            if value is not None and not self._own_host(value):
                raise Refused(403, f"refused: this POST comes from another site (its {header} is not this host)")
        try:
            super().check_xsrf_cookie()
        except tornado.web.HTTPError as exc:
            raise Refused(
                403, "refused: the form's CSRF token (_xsrf) is missing or does not match its cookie; reload the page"
            ) from exc

    def _own_host(self, url: str) -> bool:
        try:
            parts = urlsplit(url)
        except ValueError:
            return False
        hosts = {self.request.host.lower()}
        forwarded = self.request.headers.get("X-Forwarded-Host")
        if self.web.behind_proxy and forwarded:
            hosts.add(forwarded.split(",")[0].strip().lower())
        return parts.scheme in ("http", "https") and parts.netloc.lower() in hosts

    def get_template_path(self) -> str:
        return str(TEMPLATES)

    def render_page(self, template: str, **kwargs: Any) -> None:
        kwargs.setdefault("query", "")
        self.render(template, web=self.web, url=self.web.url, app_name=self.celery_app.main or "", **kwargs)

    def write_json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        text = json.dumps(value, indent=2, sort_keys=True, default=str)
        # The same JSON, with nothing in it that a browser sniffing it as HTML would run.
        self.finish(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))

    def log_exception(
        self, typ: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(value, SagaError):
            # A known condition (the store is down, a record is corrupt): one line, its message says it all.
            app_log.error("%s %s: %s", self.request.method, self.request.uri, value)
        else:
            super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, SagaStoreUnavailable):
            status_code = 503  # try again later, as the CLI's exit code 69 says
            self.set_status(status_code)
        if isinstance(exc, Refused):
            message = exc.text
        elif isinstance(exc, SagaError):  # the store is unavailable (its password masked) ...
            message = str(exc)
        else:  # Tornado's own errors can hold what was sent ("Invalid unicode in ..."): only the phrase
            message = responses.get(status_code, "Unknown")
        if self.api:
            self.write_json({"error": message, "status": status_code})
        else:
            self.set_header("Content-Type", "text/html; charset=UTF-8")
            self.finish(f"{status_code}: {xhtml_escape(message)}\n")

    def int_argument(self, name: str, default: int, low: int, high: int | None = None) -> int:
        """A whole-number query argument from ``low`` to ``high``; a 400 that says so otherwise."""
        text = self.get_query_argument(name, str(default))
        try:
            value = int(text)
        except ValueError:  # not a number, or more digits than int() takes
            value = None
        if value is None or value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise Refused(400, f"{name} must be a whole number {bounds}, not {text[:40]!r}")
        return value


def time_filter(text: str) -> datetime | None:
    """``admin.parse_since`` of a form field, a time ago made a time; None for an empty one.

    Raises:
        ValueError: not a time, or one too far back or ahead to compute
            (OverflowError is a ValueError here).
    """
    if not text.strip():
        return None
    try:
        value = admin.parse_since(text)
        return datetime.now(UTC) - value if isinstance(value, timedelta) else value
    except OverflowError as exc:
        raise ValueError(f"{text[:40]!r} is too far from now") from exc


def business_keys(query: str) -> dict[str, str] | None:
    """``order_id=7 customer_id=c1`` as business keys; None if the query is not such a list (an id, a key)."""
    if "=" not in query:
        return None
    try:
        return dict(where_pairs(query.split()))
    except ValueError:
        return None


def saga_url(web: WebSettings, saga_id: str, rest: str = "") -> str:
    """The URL of a saga's page (``rest``: a query string to add)."""
    return web.url("/saga/" + quote(saga_id, safe=":") + rest)
