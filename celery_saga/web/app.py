"""The web view's Tornado application: the saga list, one saga's page, the JSON API, ``/metrics`` and actions.

Pages are rendered on the server (``templates/``), with no JavaScript: a
running saga's page refreshes itself by a meta tag. Store calls are short
and made on the IO loop, as Flower makes its own.

What a request brings is read at the edge (`celery_saga.web.base`). A
record that cannot be parsed is shown as such, never a broken page. Bulk
actions are `celery_saga.web.bulk`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import tornado.web
from celery import Celery

from .. import admin
from ..bulk_actions import ACTIONS
from ..errors import SagaDefinitionError, SagaNotFound, SagaRecordCorrupt, SagaStateError
from ..locks import lock_status
from ..messages import parse_task_id
from ..metrics import metrics_text
from ..rerun import rerun_saga
from ..saga import saga_id_for
from ..search import where_pairs
from ..settings import redact_keys
from ..shutdown import interrupted_by_signals
from ..state import SagaStatus
from ..stores import store_for
from ..views import SagaSummary, state_json
from .base import BaseHandler, Refused, business_keys, saga_url, time_filter
from .bulk import BulkPage
from .settings import MAX_LIMIT, WebSettings
from .timeline import bars, details

__all__ = ["make_app", "serve"]

# What a saga page's ``done`` says after an action: only these, never text from the URL.
_DONE = ("cancelled", "already finished", "retried", "a re-run: this is a new saga")


def _summary_json(s: SagaSummary) -> dict[str, Any]:
    """``celery saga list --json``'s entry; a corrupt record's also says ``"corrupt": true``."""
    return {**s.to_json(), "corrupt": True} if s.corrupt else s.to_json()


def _duration(s: SagaSummary, now: datetime) -> str:
    if s.created_at is None:
        return ""
    end = s.status_at if s.status.finished and s.status_at else now
    seconds = max(0.0, (end - s.created_at).total_seconds())
    return f"{seconds:.2f}s" if seconds < 60 else f"{seconds / 60:.1f}m"


class ListPage(BaseHandler):
    def get(self) -> None:
        query = self.get_query_argument("q", "").strip()
        # "order_id=7" (or several, by spaces) is a business key search: a listing.
        where = business_keys(query)
        if query and where is None:
            found = self._search(query)
            if found:
                self.redirect(saga_url(self.web, found))
                return
        status = self.get_query_argument("status", "") or None
        name = self.get_query_argument("name", "") or None
        try:
            since = time_filter(self.get_query_argument("since", ""))
            until = time_filter(self.get_query_argument("until", ""))
            if status is not None:
                SagaStatus(status)
        except ValueError as exc:
            raise Refused(400, f"bad filter: {exc}") from exc
        # Each page reads every saga before it: the pages stop MAX_DEPTH sagas back.
        page = self.int_argument("page", 1, 1, self.web.max_page)
        size = self.web.page_size
        sagas = admin.list_sagas(
            self.celery_app, status=status, name=name, since=since, limit=page * size + 1, where=where
        )
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
            not_found=bool(query) and where is None,
            where=where,
            actions=sorted(ACTIONS),
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


class SagaPage(BaseHandler):
    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise Refused(404, str(exc)) from exc
        except SagaRecordCorrupt as exc:
            # Its page all the same: what is wrong, and Purge to clean it up.
            self.set_status(500)
            self.render_page("corrupt.html", saga_id=saga_id, error=str(exc), saga_url=saga_url(self.web, saga_id))
            return
        redact = redact_keys(self.celery_app)
        done = self.get_query_argument("done", "")
        rows, span = bars(state)
        held = lock_status(self.celery_app, state)
        shown = state_json(state, redact, admin.step_workers(self.celery_app, state), held)
        self.render_page(
            "saga.html",
            state=state,
            rows=rows,
            span=span,
            steps=details(state, redact),
            search_keys=shown["search_keys"],
            locks=held,
            kwargs_json=json.dumps(shown["kwargs"], indent=2, sort_keys=True),
            data_json=json.dumps(shown["data"], indent=2, sort_keys=True),
            running_on=[(s["name"], s["worker"]) for s in shown["steps"] if "worker" in s],
            flower=self.web.flower_url,
            dumps=lambda v: json.dumps(v, sort_keys=True),
            message=done if done in _DONE else "",
        )


class Action(BaseHandler):
    """POST /saga/<id>/<cancel|retry|purge|rerun>: only with --enable-actions, with the page's XSRF token."""

    def post(self, saga_id: str, action: str) -> None:
        if not self.web.enable_actions:
            raise Refused(403, "actions are off: start the server with --enable-actions")
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
            elif action == "rerun":
                started = rerun_saga(app, saga_id)
                self.redirect(saga_url(self.web, started.id, "?" + urlencode({"done": _DONE[3]})))
                return
            else:
                raise Refused(404, f"no action {action}")
        except SagaNotFound as exc:
            raise Refused(404, str(exc)) from exc
        except (SagaStateError, SagaRecordCorrupt, SagaDefinitionError) as exc:
            raise Refused(409, str(exc)) from exc
        self.redirect(saga_url(self.web, saga_id, "?" + urlencode({"done": done})))


class ApiList(BaseHandler):
    api = True

    def get(self) -> None:
        status = self.get_query_argument("status", "").upper() or None
        try:
            since = time_filter(self.get_query_argument("since", ""))
            if status is not None:
                SagaStatus(status)
        except ValueError as exc:
            raise Refused(400, str(exc)) from exc
        # Asking for more is not an error: scripts ask for "all", and get the most there is.
        limit = min(self.int_argument("limit", 50, 1), MAX_LIMIT)
        name = self.get_query_argument("name", "") or None
        try:
            # ?where=order_id=7, repeatable: the business keys, as `celery saga list --where` takes them.
            where = dict(where_pairs(self.get_query_arguments("where"))) or None
        except ValueError as exc:
            raise Refused(400, f"bad where: {exc}") from exc
        found = admin.list_sagas(self.celery_app, status=status, name=name, since=since, limit=limit, where=where)
        self.write_json({"sagas": [_summary_json(s) for s in found]})


class ApiSaga(BaseHandler):
    api = True

    def get(self, saga_id: str) -> None:
        try:
            state = admin.saga_state(self.celery_app, saga_id)
        except SagaNotFound as exc:
            raise Refused(404, str(exc)) from exc
        except SagaRecordCorrupt as exc:
            self.set_status(500)
            self.write_json({"id": saga_id, "corrupt": True, "error": str(exc)})
            return
        workers, held = admin.step_workers(self.celery_app, state), lock_status(self.celery_app, state)
        self.write_json(state_json(state, redact_keys(self.celery_app), workers, held))


class Metrics(BaseHandler):
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
            (rf"{p}/saga/([^/]+)/(cancel|retry|purge|rerun)", Action, args),
            (rf"{p}/bulk", BulkPage, args),
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
