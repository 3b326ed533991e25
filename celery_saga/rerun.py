"""Re-running a saga that ended without completing: ``rerun_saga``, behind ``celery saga rerun``.

A re-run is a new saga of the same name, with the first one's start kwargs
and end callbacks, a new id and no idempotency key (the first saga keeps
its key: a start with it still finds the first saga). It runs the saga's
definition as this process has it now: if that is not the plan the first
saga ran, the re-run says so (`Rerun.plan_changed`).

The two are linked both ways: the re-run's record names the first saga
(``rof``), and the first lists its re-runs (``rrs``). The link is written
first, atomically, by the first saga's ``rerun`` transition, which refuses a
saga re-run already: so a bulk re-run run twice, or two operators at once,
start one saga, not two (``again=True`` re-runs one more time).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from celery import Celery

from . import codec
from .errors import SagaDefinitionError, SagaNotFound, SagaRecordCorrupt, SagaStateError
from .registry import sagas_of
from .result import SagaResult
from .state import SagaStatus
from .store import Outcome
from .stores import store_for

__all__ = ["Rerun", "rerun", "rerun_saga"]

logger = logging.getLogger("celery_saga")

_ALLOWED = (SagaStatus.COMPENSATED, SagaStatus.FAILED)
_ONLY = "only a saga that ended COMPENSATED or FAILED is re-run"


@dataclass(frozen=True)
class Rerun:
    """A re-run started: its handle, and whether it runs another plan than the first saga ran.

    Attributes:
        result: The re-run's handle (its ``id`` is the new saga's).
        of: The id of the saga it re-runs.
        plan_changed: The saga's definition changed since the first saga
            started: the re-run runs the current one.
        old_plan, new_plan: The two plan digests.
    """

    result: SagaResult
    of: str
    plan_changed: bool
    old_plan: str
    new_plan: str


def rerun_saga(app: Celery, saga_id: str, *, again: bool = False) -> SagaResult:
    """Start a new saga with the name, start kwargs and callbacks of COMPENSATED or FAILED saga ``saga_id``.

    Returns the new saga's handle. If the saga's definition changed since
    ``saga_id`` started, the re-run runs the current definition, and a
    warning says so (`rerun` tells it in its return value).

    Raises:
        SagaNotFound: no saga ``saga_id``.
        SagaStateError: it is not COMPENSATED or FAILED, it was re-run
            already (``again=True`` re-runs it once more), or it is a child
            saga (re-run its parent).
        SagaDefinitionError: no saga of its name is defined in this process.
        SagaRecordCorrupt: its record cannot be read.
    """
    return rerun(app, saga_id, again=again).result


def rerun(app: Celery, saga_id: str, *, again: bool = False) -> Rerun:
    """`rerun_saga`, telling whether the re-run runs another plan than the first saga did."""
    store = store_for(app)
    raw = store.load(saga_id)
    name, status = raw.get("name", ""), raw.get("status", "")
    if status not in {s.value for s in _ALLOWED}:
        raise SagaStateError(saga_id, status, "re-run", _ONLY)
    if raw.get("parent"):
        # Its end callback tells its parent; a copy that no parent waits for would be refused as forged.
        raise SagaStateError(
            saga_id, status, "re-run", f"it is a child saga, a step of saga {raw['parent']}: re-run that one"
        )
    defined = {s.plan_digest(): s for s in sagas_of(app) if s.name == name}
    if not defined:
        raise SagaDefinitionError(
            f"saga {saga_id} is a {name!r}, which this process does not define: import the module that "
            f"defines it (celery -A <that app>) to re-run it"
        )
    if len(defined) > 1:
        raise SagaDefinitionError(
            f"this process defines {len(defined)} different sagas named {name!r}: a re-run would not know "
            f"which is current; define it once"
        )
    saga = next(iter(defined.values()))
    try:
        kwargs = codec.loads(raw["kwargs"])
    except (KeyError, ValueError) as exc:
        raise SagaRecordCorrupt(saga_id, f"its start kwargs cannot be read: {exc}") from exc
    if not isinstance(kwargs, dict):
        raise SagaRecordCorrupt(saga_id, "its start kwargs are no JSON object")
    new_id = str(uuid.uuid4())
    t = store.link_rerun(saga_id, new_id, again)
    if t.outcome is Outcome.MISSING:
        raise SagaNotFound(saga_id, store.where())
    if t.outcome is Outcome.NOT_ALLOWED:
        raise SagaStateError(saga_id, t.status.value if t.status else "", "re-run", _ONLY)
    if t.outcome is Outcome.EXISTS:
        earlier = store.state(saga_id).reruns
        raise SagaStateError(
            saga_id,
            status,
            "re-run",
            f"it was re-run already, as {', '.join(earlier)}: again=True (--again) re-runs it once more",
        )
    if t.outcome is not Outcome.RECORDED:
        raise SagaRecordCorrupt(saga_id, f"the store refused to link a re-run ({t.outcome.value})")
    result = saga.start_rerun(saga_id, new_id, kwargs, (raw.get("cb_ok", ""), raw.get("cb_fail", "")))
    old, new = raw.get("ph", ""), saga.plan_digest()
    if old != new:
        logger.warning(
            "saga %s ran plan %s of %s; its re-run %s runs the current definition, plan %s",
            saga_id,
            old[:12],
            name,
            new_id,
            new[:12],
        )
    return Rerun(result, saga_id, old != new, old, new)
