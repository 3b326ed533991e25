"""The web view's Tornado application: the saga list, one saga's page, the JSON API, ``/metrics`` and actions.

Pages are rendered on the server (``templates/``), with no JavaScript: a
running saga's page refreshes itself by a meta tag. Store calls are short
and made on the IO loop, as Flower makes its own.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import tornado.web
from celery import Celery

from .. import admin
from ..errors import SagaError, SagaNotFound, SagaStateError
from ..messages import parse_task_id
from ..metrics import metrics_text
from ..saga import saga_id_for
from ..settings import redact_keys
from ..shutdown import interrupted_by_signals
from ..state import SagaStatus
from ..stores import store_for
from ..views import SagaSummary, state_json
from .timeline import bars, details

__all__ = ["PAGE_SIZE", "WebSettings", "make_app", "serve"]

PAGE_SIZE = 50
_TEMPLATES = Path(__file__).parent / "templates"


class WebSettings:
    """How ``celery saga web`` was started."""

    def __init__(
        self,
        url_prefix: str = "",
        flower_url: str | None = None,
        basic_auth: Sequence[str] = (),
        enable_actions: bool = False,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.page_size = page_size
        self.url_prefix = "/" + url_prefix.strip("/") if url_prefix.strip("/") else ""
        self.flower_url = flower_url.rstrip("/") if flower_url else None
        for pair in basic_auth:
            if ":" not in pair:
                raise ValueError(f"--basic-auth takes user:password, not {pair!r}")
        self.basic_auth = tuple(basic_auth)
        self.enable_actions = enable_actions

    def url(self, path: str) -> str:
        return f"{self.url_prefix}{path}"


class _Base(tornado.web.RequestHandler):
    def initialize(self, celery_app: Celery, web: WebSettings) -> None:
        self.celery_app, self.web = celery_app, web

    def prepare(self) -> None:
        if self.web.basic_auth and not self._authenticated():
            self.set_status(401)
            self.set_header("WWW-Authenticate", 'Basic realm="celery saga"')
            self.finish("authentication required\n")

    def _authenticated(self) -> bool:
        header = self.request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            given = base64.b64decode(header[6:], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        return any(hmac.compare_digest(given, pair) for pair in self.web.basic_auth)

    def get_template_path(self) -> str:
        return str(_TEMPLATES)

    def render_page(self, template: str, **kwargs: Any) -> None:
        kwargs.setdefault("query", "")
        self.render(template, web=self.web, url=self.web.url, app_name=self.celery_app.main or "", **kwargs)

    def write_json(self, value: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(value, indent=2, sort_keys=True, default=str))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None))[1]
        message = str(exc) if isinstance(exc, SagaError) else self._reason
        self.finish(f"{status_code}: {message}\n")


def _parse_time(text: str) -> datetime | timedelta | None:
    """``admin.parse_since`` of a form field; None for an empty one."""
    return admin.parse_since(text) if text.strip() else None


def _when(value: datetime | timedelta | None) -> datetime | None:
    if isinstance(value, timedelta):
        return datetime.now(UTC) - value
    return value


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
                self.redirect(self.web.url(f"/saga/{found}"))
                return
        status = self.get_query_argument("status", "") or None
        name = self.get_query_argument("name", "") or None
        try:
            since = _parse_time(self.get_query_argument("since", ""))
            until = _when(_parse_time(self.get_query_argument("until", "")))
            page = max(1, int(self.get_query_argument("page", "1")))
            if status is not None:
                SagaStatus(status)
        except ValueError as exc:
            raise tornado.web.HTTPError(400, reason=f"bad filter: {exc}") from exc
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
        for saga_id, raw in zip(candidates, store.load_many(candidates), strict=True):
            if raw:
                return saga_id
        return None


class SagaPage(_Base):
    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise tornado.web.HTTPError(404, reason=str(exc)) from exc
        redact = redact_keys(self.celery_app)
        rows, span = bars(state)
        shown = state_json(state, redact)
        self.render_page(
            "saga.html",
            state=state,
            rows=rows,
            span=span,
            steps=details(state, redact),
            kwargs_json=json.dumps(shown["kwargs"], indent=2, sort_keys=True),
            data_json=json.dumps(shown["data"], indent=2, sort_keys=True),
            flower=self.web.flower_url,
            dumps=lambda v: json.dumps(v, sort_keys=True),
            message=self.get_query_argument("done", ""),
        )


class Action(_Base):
    """POST /saga/<id>/<cancel|retry|purge>: only with --enable-actions, with the page's XSRF token."""

    def post(self, saga_id: str, action: str) -> None:
        if not self.web.enable_actions:
            raise tornado.web.HTTPError(403, reason="actions are off: start the server with --enable-actions")
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
                raise tornado.web.HTTPError(404)
        except SagaNotFound as exc:
            raise tornado.web.HTTPError(404, reason=str(exc)) from exc
        except SagaStateError as exc:
            raise tornado.web.HTTPError(409, reason=str(exc)) from exc
        self.redirect(self.web.url(f"/saga/{saga_id}?" + urlencode({"done": done})))


class ApiList(_Base):
    def get(self) -> None:
        try:
            since = _parse_time(self.get_query_argument("since", ""))
            limit = int(self.get_query_argument("limit", "50"))
            status = self.get_query_argument("status", "") or None
            found = admin.list_sagas(
                self.celery_app,
                status=status.upper() if status else None,
                name=self.get_query_argument("name", "") or None,
                since=since,
                limit=limit,
            )
        except ValueError as exc:
            raise tornado.web.HTTPError(400, reason=str(exc)) from exc
        self.write_json({"sagas": [s.to_json() for s in found]})


class ApiSaga(_Base):
    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise tornado.web.HTTPError(404, reason=str(exc)) from exc
        self.write_json(state_json(state, redact_keys(self.celery_app)))


class Metrics(_Base):
    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(metrics_text(self.celery_app))


def make_app(celery_app: Celery, web: WebSettings | None = None) -> tornado.web.Application:
    """The Tornado application serving ``celery_app``'s sagas."""
    web = web or WebSettings()
    args = {"celery_app": celery_app, "web": web}
    p = web.url_prefix
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
    saga store that does not answer (`celery_saga.shutdown`).

    Raises:
        OSError: it cannot listen on ``address:port`` (the port is taken ...).
    """

    async def main() -> None:
        server = make_app(celery_app, web).listen(port, address=address, xheaders=True)
        try:
            if ready is not None:
                ready()
            await asyncio.Event().wait()  # until a signal interrupts the loop
        finally:
            server.stop()

    with interrupted_by_signals(), contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
