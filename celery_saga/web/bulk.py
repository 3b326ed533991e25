"""Bulk actions in the web view (``--enable-actions``): a filtered list's sagas cancelled, retried, purged or re-run.

``GET /bulk?action=...&<the list's filters>`` counts what the action would
act on (`celery_saga.bulk` with ``dry_run``) and shows a confirmation page: the
count, the first ids, and a form. Its ``POST`` (with the page's XSRF token)
runs the action on every saga the filters match then, and shows the report.
A relative ``since`` ("1h") is fixed to a time on the confirmation page, so
that the action acts on the window that was counted.

Both run in a thread, off the IO loop: a bulk action over thousands of sagas
takes seconds, and the other pages must answer meanwhile.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from ..bulk_actions import ACTIONS, bulk
from ..state import SagaStatus
from ..views import iso
from .base import BaseHandler, Refused, business_keys, time_filter

__all__ = ["BulkPage"]


class BulkPage(BaseHandler):
    """``/bulk``: a confirmation page (GET), then the action (POST)."""

    async def get(self) -> None:
        await self._page(self.get_query_argument, done=False)

    async def post(self) -> None:
        await self._page(self.get_body_argument, done=True)

    async def _page(self, argument: Any, done: bool) -> None:
        """Count (``done`` False: a dry run, and the confirmation form) or act, and show what came of it."""
        action, filters = self._read(argument)
        app = self.celery_app
        report = await asyncio.get_running_loop().run_in_executor(
            None, lambda: bulk(app, action, dry_run=not done, **filters)
        )
        fields = _fields(filters)
        described = ", ".join(f"{k} {v}" for k, v in fields) or "none: every saga the action applies to"
        self.render_page("bulk.html", action=action, report=report, fields=fields, described=described, done=done)

    def _read(self, argument: Any) -> tuple[str, dict[str, Any]]:
        """The action and the filters, from the query (GET) or the form (POST), checked."""
        if not self.web.enable_actions:
            raise Refused(403, "actions are off: start the server with --enable-actions")
        action = argument("action", "")
        if action not in ACTIONS:
            raise Refused(400, f"action must be one of {', '.join(sorted(ACTIONS))}")
        status = argument("status", "").upper() or None
        query = argument("q", "").strip()
        where = business_keys(query)
        if query and where is None:
            raise Refused(400, "q must be business keys, as in order_id=7, for a bulk action")
        try:
            if status is not None:
                SagaStatus(status)
            since, until = time_filter(argument("since", "")), time_filter(argument("until", ""))
        except ValueError as exc:
            raise Refused(400, f"bad filter: {exc}") from exc
        name = argument("name", "") or None
        return action, {"name": name, "status": status, "since": since, "until": until, "where": where}


def _fields(filters: dict[str, Any]) -> list[tuple[str, str]]:
    """The filters as the confirmation form's hidden fields: times absolute, business keys as ``q``."""
    out = []
    for key in ("name", "status", "since", "until"):
        value = filters[key]
        if value is not None:
            out.append((key, iso(value) or "" if isinstance(value, datetime) else str(value)))
    if filters["where"]:
        out.append(("q", " ".join(f"{k}={v}" for k, v in filters["where"].items())))
    return out
