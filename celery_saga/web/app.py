"""The web view's Tornado application: the saga list, one saga's page, the JSON API, ``/metrics`` and actions.

Pages are rendered on the server (``templates/``), with no JavaScript: a
running saga's page refreshes itself by a meta tag. Store calls are short
and made on the IO loop, as Flower makes its own.

What a request brings (query arguments, ids in the path, headers) is read
here, at the edge. An error body echoes it escaped, and never in the HTTP
reason phrase: Tornado up to 6.4 wrote the reason into its error page
unescaped. A record that cannot be parsed is shown as such, never a broken
page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from http.client import responses
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import tornado.web
from celery import Celery
from tornado.escape import xhtml_escape
from tornado.log import app_log

from .. import admin
from ..errors import SagaError, SagaNotFound, SagaRecordCorrupt, SagaStateError, SagaStoreUnavailable
from ..messages import parse_task_id
from ..metrics import metrics_text
from ..saga import saga_id_for
from ..settings import redact_keys
from ..shutdown import interrupted_by_signals
from ..state import SagaStatus
from ..stores import store_for
from ..views import SagaSummary, state_json
from .settings import MAX_LIMIT, WebSettings
from .timeline import bars, details

__all__ = ["make_app", "serve"]

_TEMPLATES = Path(__file__).parent / "templates"
# Pages need nothing but their own inline styles and forms; no page may frame them (the action buttons).
_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
# What a saga page's ``done`` says after an action: only these, never text from the URL.
_DONE = ("cancelled", "already finished", "retried")


class _Refused(tornado.web.HTTPError):
    """An error answer whose message (it may hold what the request sent) goes into the body, escaped.

    The HTTP reason phrase stays the standard one for the status.
    """

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(status_code)
        self.text = message


class _Base(tornado.web.RequestHandler):
    #: Errors as JSON (the API), or as a line of escaped text (pages).
    api = False

    def initialize(self, celery_app: Celery, web: WebSettings) -> None:
        self.celery_app, self.web = celery_app, web

    def set_default_headers(self) -> None:
        # Set again on error answers (send_error clears the others).
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Content-Security-Policy", _CSP)
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
                raise _Refused(403, f"refused: this POST comes from another site (its {header} is not this host)")
        try:
            super().check_xsrf_cookie()
        except tornado.web.HTTPError as exc:
            raise _Refused(
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
        return str(_TEMPLATES)

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
        if isinstance(exc, _Refused):
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
            raise _Refused(400, f"{name} must be a whole number {bounds}, not {text[:40]!r}")
        return value


def _time_filter(text: str) -> datetime | None:
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


def _summary_json(s: SagaSummary) -> dict[str, Any]:
    """``celery saga list --json``'s entry; a corrupt record's also says ``"corrupt": true``."""
    return {**s.to_json(), "corrupt": True} if s.corrupt else s.to_json()


def _saga_url(web: WebSettings, saga_id: str, rest: str = "") -> str:
    return web.url("/saga/" + quote(saga_id, safe=":") + rest)


def _duration(s: SagaSummary, now: datetime) -> str:
    if s.created_at is None:
        return ""
    end = s.status_at if s.status.finished and s.status_at else now
    seconds = max(0.0, (end - s.created_at).total_seconds())
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}m"


class ListPage(_Base):
    def get(self) -> None:
        query = self.get_query_argument("q", "").strip()
        if query:
            found = self._search(query)
            if found:
                self.redirect(_saga_url(self.web, found))
                return
        status = self.get_query_argument("status", "") or None
        name = self.get_query_argument("name", "") or None
        try:
            since = _time_filter(self.get_query_argument("since", ""))
            until = _time_filter(self.get_query_argument("until", ""))
            if status is not None:
                SagaStatus(status)
        except ValueError as exc:
            raise _Refused(400, f"bad filter: {exc}") from exc
        # Each page reads every saga before it: the pages stop MAX_DEPTH sagas back.
        page = self.int_argument("page", 1, 1, self.web.max_page)
        size = self.web.page_size
        sagas = admin.list_sagas(self.celery_app, status=status, name=name, since=since, limit=page * size + 1)
        if until is not None:
            sagas = [s for s in sagas if s.status_at is not None and s.status_at <= until]
        shown = sagas[(page - 1) * size : page * size]
        stats = admin.saga_stats(self.celery_app)
        filters = {k: v for k, v in self.request.query_arguments.items() if k != "page"}

        def page_url(n: int) -> str:
            args = {k: v[-1].decode() for k, v in filters.items()}
            return self.web.url("/?" + urlencode({**args, "page": n}))

        self.render_page(
            "list.html",
            sagas=shown,
            stats=stats,
            names=sorted(stats.by_name),
            statuses=[s.value for s in SagaStatus],
            now=datetime.now(UTC),
            duration=_duration,
            query=query,
            not_found=bool(query),
            filters={k: self.get_query_argument(k, "") for k in ("name", "status", "since", "until")},
            page=page,
            prev_url=page_url(page - 1) if page > 1 else None,
            next_url=page_url(page + 1) if len(sagas) > page * size else None,
        )

    def _search(self, query: str) -> str | None:
        """The saga a search names: by id, by a step's task id, or by idempotency key (of any saga name)."""
        store = store_for(self.celery_app)
        parsed = parse_task_id(query)
        candidates = [query, *([parsed[0]] if parsed else [])]
        names = set(admin.saga_stats(self.celery_app).by_name)
        candidates += [saga_id_for(name, query) for name in sorted(names)]
        try:
            found = store.load_many(candidates)
        except SagaRecordCorrupt:
            # A record that cannot be read fails the whole batch; it is there all the same.
            found = []
            for saga_id in candidates:
                try:
                    found += store.load_many([saga_id])
                except SagaRecordCorrupt:
                    found.append({"corrupt": "1"})
        for saga_id, raw in zip(candidates, found, strict=True):
            if raw:
                return saga_id
        return None


class SagaPage(_Base):
    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        except SagaRecordCorrupt as exc:
            # Its page all the same: what is wrong, and Purge to clean it up.
            self.set_status(500)
            self.render_page("corrupt.html", saga_id=saga_id, error=str(exc), saga_url=_saga_url(self.web, saga_id))
            return
        redact = redact_keys(self.celery_app)
        done = self.get_query_argument("done", "")
        rows, span = bars(state)
        shown = state_json(state, redact, admin.step_workers(self.celery_app, state))
        self.render_page(
            "saga.html",
            state=state,
            rows=rows,
            span=span,
            steps=details(state, redact),
            kwargs_json=json.dumps(shown["kwargs"], indent=2, sort_keys=True),
            data_json=json.dumps(shown["data"], indent=2, sort_keys=True),
            running_on=[(s["name"], s["worker"]) for s in shown["steps"] if "worker" in s],
            flower=self.web.flower_url,
            dumps=lambda v: json.dumps(v, sort_keys=True),
            message=done if done in _DONE else "",
        )


class Action(_Base):
    """POST /saga/<id>/<cancel|retry|purge>: only with --enable-actions, with the page's XSRF token."""

    def post(self, saga_id: str, action: str) -> None:
        if not self.web.enable_actions:
            raise _Refused(403, "actions are off: start the server with --enable-actions")
        app = self.celery_app
        try:
            if action == "cancel":
                done = "cancelled" if admin.cancel_saga(app, saga_id) else "already finished"
            elif action == "retry":
                admin.retry_saga(app, saga_id)
                done = "retried"
            elif action == "purge":
                admin.purge_saga(app, saga_id)
                self.redirect(self.web.url("/"))
                return
            else:
                raise _Refused(404, f"no action {action}")
        except SagaNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        except (SagaStateError, SagaRecordCorrupt) as exc:
            raise _Refused(409, str(exc)) from exc
        self.redirect(_saga_url(self.web, saga_id, "?" + urlencode({"done": done})))


class ApiList(_Base):
    api = True

    def get(self) -> None:
        status = self.get_query_argument("status", "").upper() or None
        try:
            since = _time_filter(self.get_query_argument("since", ""))
            if status is not None:
                SagaStatus(status)
        except ValueError as exc:
            raise _Refused(400, str(exc)) from exc
        # Asking for more is not an error: scripts ask for "all", and get the most there is.
        limit = min(self.int_argument("limit", 50, 1), MAX_LIMIT)
        name = self.get_query_argument("name", "") or None
        found = admin.list_sagas(self.celery_app, status=status, name=name, since=since, limit=limit)
        self.write_json({"sagas": [_summary_json(s) for s in found]})


class ApiSaga(_Base):
    api = True

    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise _Refused(404, str(exc)) from exc
        except SagaRecordCorrupt as exc:
            self.set_status(500)
            self.write_json({"id": saga_id, "corrupt": True, "error": str(exc)})
            return
        self.write_json(state_json(state, redact_keys(self.celery_app), admin.step_workers(self.celery_app, state)))


class Metrics(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(metrics_text(self.celery_app))


def make_app(celery_app: Celery, web: WebSettings | None = None) -> tornado.web.Application:
    """The Tornado application serving ``celery_app``'s sagas."""
    web = web or WebSettings()
    args = {"celery_app": celery_app, "web": web}
    p = re.escape(web.url_prefix)  # checked to be plain path segments; "." is still a regex's any-character
    return tornado.web.Application(
        [
            (rf"{p}/", ListPage, args),
            (rf"{p}/saga/([^/]+)", SagaPage, args),
            (rf"{p}/saga/([^/]+)/(cancel|retry|purge)", Action, args),
            (rf"{p}/api/sagas", ApiList, args),
            (rf"{p}/api/sagas/([^/]+)", ApiSaga, args),
            (rf"{p}/metrics", Metrics, args),
        ],
        xsrf_cookies=True,
        # Double-submit: the token in each form must match this cookie, which no other site's page sends
        # (Strict) and no script reads (there are none, and HttpOnly keeps it so).
        xsrf_cookie_kwargs={"samesite": "Strict", "httponly": True, "path": web.url("/")},
        autoescape="xhtml_escape",
    )


def serve(
    celery_app: Celery,
    address: str = "127.0.0.1",
    port: int = 5557,
    web: WebSettings | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve on ``address:port`` until SIGINT or SIGTERM; ``ready`` is called once it listens.

    It returns at once on either signal, also while a request waits on a
    saga store that does not answer (`celery_saga.shutdown`). With
    ``web.behind_proxy``, the client's address and scheme are taken from
    ``X-Real-Ip`` / ``X-Forwarded-For`` and ``X-Forwarded-Proto`` / ``X-Scheme``.

    Raises:
        OSError: it cannot listen on ``address:port`` (the port is taken ...).
    """
    web = web or WebSettings()

    async def main() -> None:
        # Any client can send X-Forwarded-*: they say who the client is only when a proxy sets them.
        server = make_app(celery_app, web).listen(port, address=address, xheaders=web.behind_proxy)
        try:
            if ready is not None:
                ready()
            await asyncio.Event().wait()  # until a signal interrupts the loop
        finally:
            server.stop()

    with interrupted_by_signals(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
