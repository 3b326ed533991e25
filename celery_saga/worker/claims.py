"""A saga message is a claim; the record decides.

Anyone who can publish to the broker can send any registered task, with
any headers. A message may change a saga only if its headers are well
formed (`messages.read_headers`), its generation is the record's current
one (the transitions check it), and its task is the one the saga's plan
names for the step it claims: the step's task, or, for a compensation, the
step's compensation. The plan is the one the record names, by a digest
the transitions compare with the record's own (`checked_plan`).

A message that fails any check changes nothing, its function does not
run, and it is acked. It is logged at WARNING once per saga and reason,
and counted by reason (``celery_saga_rejected_messages_total``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from celery import Celery

from ..errors import SagaError
from ..messages import MessageRejected, SagaHeaders
from ..store import SagaStore
from ..stores import store_for

__all__ = ["checked_plan", "refuse"]

logger = logging.getLogger("celery_saga")

# (saga id, reason) pairs logged already; bounded, since forged ids are unbounded.
_LOGGED: OrderedDict[tuple[str, str], None] = OrderedDict()
_LOGGED_KEPT = 10_000


def checked_plan(store: SagaStore, headers: SagaHeaders, task_name: str) -> str:
    """The digest of the plan whose task for the claimed step is ``task_name``; "" for a saga with no record.

    Raises:
        MessageRejected: the plan names another task for that step (or has no such step).
        SagaRecordCorrupt: the plan the record names is missing or altered.
    """
    digest = headers.plan or store.plan_digest(headers.saga_id)
    if not digest:
        return ""  # no record: the transition says so, and changes nothing
    plan = store.plan(digest)
    try:
        spec = plan.step(headers.step)
    except KeyError:
        raise MessageRejected("task", f"the saga's plan has no step {headers.step!r}") from None
    if headers.compensation:
        expected, what = spec.compensation, "compensation"
    else:
        expected, what = (None if spec.is_wait else spec.task), "task"
    if expected != task_name:
        raise MessageRejected(
            "task", f"task {task_name!r} is not the {what} of step {headers.step!r}, which is {expected!r}"
        )
    return digest


def refuse(app: Celery, saga_id: object, task_name: str, exc: MessageRejected) -> None:
    """Log (once per saga and reason) and count a message that changes nothing."""
    shown = repr(saga_id)[:80]
    key = (shown, exc.reason)
    if key not in _LOGGED:
        _LOGGED[key] = None
        if len(_LOGGED) > _LOGGED_KEPT:
            _LOGGED.popitem(last=False)
        logger.warning(
            "saga %s: a message for task %r was rejected (%s): %s. It changed nothing and was acked",
            shown,
            task_name,
            exc.reason,
            exc.detail,
        )
    try:
        store_for(app).count_rejected(exc.reason)
    except SagaError as err:  # the count is lost, not the rejection
        logger.debug("celery_saga: could not count a rejected message: %s", err)
