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

from ..bulk_actions import ACTIONS, BulkReport, bulk
from ..state import SagaStatus
from ..views import iso
from .base import BaseHandler, Refused, business_keys, time_filter

__all__ = ["BulkPage"]


class BulkPage(BaseHandler):
    """``/bulk``: a confirmation page (GET), then the action (POST)."""

    async def get(self) -> None:
        action, filters = self._read(self.get_query_argument)
        counted = await self._bulk(action, filters, dry_run=True)
        self.render_page(
            "bulk.html",
            action=action,
            report=counted,
            fields=_fields(filters),
            described=_described(filters),
            done=False,
        )

    async def post(self) -> None:
        action, filters = self._read(self.get_body_argument)
        report = await self._bulk(action, filters, dry_run=False)
        self.render_page(
            "bulk.html",
            action=action,
            report=report,
            fields=_fields(filters),
            described=_described(filters),
            done=True,
        )

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

    async def _bulk(self, action: str, filters: dict[str, Any], dry_run: bool) -> BulkReport:
        app = self.celery_app
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: bulk(app, action, dry_run=dry_run, **filters)
        )


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


def _described(filters: dict[str, Any]) -> str:
    """The filters in words, for the page's heading."""
    return ", ".join(f"{k} {v}" for k, v in _fields(filters)) or "none: every saga the action applies to"
