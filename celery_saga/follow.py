"""What follows a transition: the one function that decides it, for every process that makes one.

``Saga.apply_async``, the step wrapper in the pool child, the handlers in the
worker's main process, the sweeper and the operator actions each apply a
transition to a saga record and hand the result to `follow`. From the
transition's outcome it decides, in this order:

1. the events and signals of a change of saga status (announce first: the
   messages published next lead to later events, which must not overtake it);
2. the event of the message the transition was made for (done, skipped);
3. ``compensation_failed`` for each compensation attempt that failed;
4. what to publish: the first or next stage (unless the transition pushed
   it itself, `celery_saga.enqueue`); compensations, a retry after
   the backoff the transition drew; a step past the pivot sent again after
   its own backoff; or, for a copy of a message whose
   outcome is already recorded, whatever the record says was dispatched,
   since the first copy may have died before publishing (``redrive``);
5. ``on_complete`` / ``on_failure`` when the saga ends, marked sent after
   (and, from a sweeper, for a finished saga nobody marked sent);
6. the first stage of each saga that waited for its locks and may start now.

Publishing comes after the transition, so it is at-least-once: receivers
de-duplicate against the record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from celery import Celery

from . import announce, codec
from .errors import SagaRecordCorrupt
from .messages import CHILD_ENDED_TASK, publish_compensation, publish_stage, send_callback
from .plan import Plan
from .state import SagaState, SagaStatus, StepStatus, data_before
from .store import Due, Op, Outcome, SagaStore, Transition

__all__ = ["Delivery", "follow", "redrive"]

logger = logging.getLogger("celery_saga")

# Outcomes whose ``due`` compensations (and steps sent again) are published.
_ROLLBACK = frozenset(
    {Outcome.ROLLBACK, Outcome.FENCED, Outcome.BACKOFF, Outcome.GAVE_UP, Outcome.LATE, Outcome.SWEPT, Outcome.RESEND}
)
# A saga that ended this recently is most likely still having its callback
# sent by the process that ended it: a copy of a message leaves the callback
# to that process (or, if it died, to a sweeper after CALLBACK_GRACE) rather
# than sending it a second time.
_SENDING_MS = 2000
# A message's copy is not run for these; a step event says why.
_BEGIN_OPS = frozenset({Op.BEGIN, Op.COMP_BEGIN})


@dataclass(frozen=True)
class Delivery:
    """The message a transition was made for, when it was made for one."""

    task_id: str
    step: str
    compensation: bool = False


def follow(app: Celery, store: SagaStore, t: Transition, delivery: Delivery | None = None) -> None:
    """Announce, publish and call back whatever transition ``t`` calls for."""
    raw: dict[str, str] | None = None

    def load() -> dict[str, str]:
        nonlocal raw
        if raw is None:
            raw = store.load(t.saga_id)
        return raw

    if t.changed_from is not None:
        announce.saga_transition(app, t, load)
    if delivery is not None:
        _announce_delivery(app, t, delivery)
    outcome = t.outcome
    if outcome in (Outcome.CREATED, Outcome.NEXT_STAGE):
        _publish_stage(app, store, t)
        if outcome is Outcome.CREATED:
            announce.saga_started(t.saga_id, t.name, t.data or {}, t.gen)
    elif outcome is Outcome.COMPLETED:
        if t.callback:
            _call_back(app, store, t.saga_id, t.gen, t.name, "on_complete", t.callback, load)
    elif outcome in _ROLLBACK:
        _publish_rollback(app, store, t, load)
        if outcome is Outcome.SWEPT and t.callback:
            # The process that ended the saga died before sending it.
            which = "on_complete" if t.status is SagaStatus.COMPLETED else "on_failure"
            _call_back(app, store, t.saga_id, t.gen, t.name, which, t.callback, load)
    elif outcome is Outcome.DUPLICATE and t.op in _BEGIN_OPS and t.status is not None:
        redrive(app, store, t.saga_id)
    if t.redrive:
        redrive(app, store, t.saga_id)
    for admitted in t.admitted:
        _start_admitted(app, store, admitted)


def _start_admitted(app: Celery, store: SagaStore, saga_id: str) -> None:
    """Publish the first stage of a saga that waited for its locks, which this transition let start.

    Its record has the stage dispatched already; should this fail (or the
    process die first), a sweeper publishes it (store/locks.lua ``adm``).
    """
    try:
        redrive(app, store, saga_id)
    except Exception:
        logger.exception("saga %s: its locks are free, but its first stage could not be published yet", saga_id)


def _announce_delivery(app: Celery, t: Transition, delivery: Delivery) -> None:
    extra = {"compensation": True} if delivery.compensation else {}
    if t.op in _BEGIN_OPS and t.outcome is not Outcome.RUN:
        announce.step_event(
            app, "skipped", delivery.task_id, t.saga_id, t.name, delivery.step, reason=t.outcome.value, **extra
        )
    elif t.op is Op.DONE and t.outcome not in (Outcome.DUPLICATE, Outcome.MISSING):
        announce.step_event(app, "done", delivery.task_id, t.saga_id, t.name, delivery.step)


def _publish_stage(app: Celery, store: SagaStore, t: Transition) -> None:
    if t.enqueued or t.waiting:
        # The transition pushed them itself (celery_saga.enqueue), or the saga
        # waits for its locks: the transition that lets it start dispatches them.
        return
    assert t.stage is not None and t.data is not None
    plan = store.plan(t.plan_digest)
    stage, secrets = plan.stages[t.stage], plan.redacted_keys
    first = t.stage == 0
    publish_stage(
        app,
        t.saga_id,
        t.name,
        t.gen,
        stage,
        t.data,
        first=first,
        redact=secrets,
        epoch=store.epoch(),
        plan=t.plan_digest,
    )


def _publish_rollback(app: Celery, store: SagaStore, t: Transition, load: Callable[[], dict[str, str]]) -> None:
    if not t.due and not t.ended:
        return
    raw = load()
    plan = store.plan(raw["ph"])
    checked_tasks(t.saga_id, raw, plan)
    for due in t.due:
        if due.forward:
            _send_forward_again(app, store, t, raw, plan, due)
            continue
        if due.attempt:
            # A missed deadline counts as a failed attempt, and is announced as one.
            error = raw.get(f"ce:{due.step}" if due.round == 1 else f"ce2:{due.step}") or "timeout"
            announce.compensation_attempt_failed(
                t.saga_id, t.name, due.step, due.attempt, error, due.gave_up, due.round
            )
        if not due.gave_up:
            countdown = due.delay if due.attempt else None
            publish_compensation(
                app, t.saga_id, raw, plan, due.step, countdown=countdown, round=due.round, epoch=store.epoch()
            )
    if t.ended:
        _call_back(app, store, t.saga_id, t.gen, t.name, "on_failure", raw.get("cb_fail", ""), load)


def _send_forward_again(
    app: Celery, store: SagaStore, t: Transition, raw: dict[str, str], plan: Plan, due: Due
) -> None:
    """Send a step past the pivot (or the pivot, its outcome lost) again, after the delay its transition drew."""
    if due.attempt:
        announce.forward_attempt_failed(
            t.saga_id, t.name, due.step, due.attempt, raw.get(f"e:{due.step}") or "", due.gave_up, due.delay
        )
    if due.gave_up:
        return
    spec = plan.step(due.step)
    data = data_before(plan, raw, spec.stage, codec.loads(raw["kwargs"]))
    publish_stage(
        app,
        t.saga_id,
        raw.get("name", t.name),
        raw.get("gen", t.gen),
        [spec],
        data,
        first=spec.stage == 0,
        redact=plan.redacted_keys,
        epoch=store.epoch(),
        countdown=due.delay or None,
        plan=raw["ph"],
    )


def _call_back(
    app: Celery,
    store: SagaStore,
    saga_id: str,
    gen: str,
    name: str,
    which: str,
    sig_json: str,
    load: Callable[[], dict[str, str]],
) -> None:
    if not sig_json:
        return
    checked_callback(saga_id, sig_json, load)
    send_callback(app, saga_id, which, sig_json, lambda: SagaState.from_record(saga_id, load()))
    store.apply(Op.CALLBACK_SENT, saga_id, gen or "*", name, tx="")


def checked_tasks(saga_id: str, raw: dict[str, str], plan: Plan) -> None:
    """Check that the compensations the record names are the ones its (digest-checked) plan names.

    The record's ``comp:<step>`` fields decide which steps are compensated;
    the task sent is always the plan's. A record whose fields say otherwise
    was written by something other than a saga start.

    Raises:
        SagaRecordCorrupt: a compensation the plan does not name.
    """
    for spec in plan.steps:
        recorded = raw.get(f"comp:{spec.name}")
        if recorded is not None and recorded != spec.compensation:
            raise SagaRecordCorrupt(
                saga_id,
                f"it names {recorded!r} as the compensation of {spec.name!r}, which its plan does not "
                f"({spec.compensation!r}); nothing was sent",
            )


def checked_callback(saga_id: str, sig_json: str, load: Callable[[], dict[str, str]]) -> None:
    """Check a child saga's end callback against its record: the parent and generation it names.

    Raises:
        SagaRecordCorrupt: the callback is not a signature, or names another parent.
    """
    try:
        sig = codec.loads(sig_json)
        task, kwargs = sig["task"], sig.get("kwargs") or {}
    except (ValueError, KeyError, TypeError) as exc:
        raise SagaRecordCorrupt(saga_id, f"its end callback is not a signature: {exc}") from exc
    if task != CHILD_ENDED_TASK:
        return
    raw = load()
    if (kwargs.get("parent"), kwargs.get("parent_gen")) != (raw.get("parent"), raw.get("pgen")):
        raise SagaRecordCorrupt(saga_id, "its end callback names another parent than its record; nothing was sent")


def redrive(app: Celery, store: SagaStore, saga_id: str) -> None:
    """Re-publish whatever the record says was dispatched, for a copy whose first run may have died.

    Receivers skip copies of a step that is already running or done, so a
    needless re-publish costs a message, never a second effect.
    """
    raw = store.load(saga_id)
    plan = store.plan(raw["ph"])
    checked_tasks(saga_id, raw, plan)
    status, name, gen = raw["status"], raw.get("name", ""), raw.get("gen", "")
    dispatched = StepStatus.DISPATCHED.value
    if status in (SagaStatus.PENDING.value, SagaStatus.RUNNING.value):
        k = int(raw.get("stage", "0"))
        data = data_before(plan, raw, k, codec.loads(raw["kwargs"]))
        specs = [spec for spec in plan.stages[k] if raw.get(f"s:{spec.name}") == dispatched]
        secrets, epoch = plan.redacted_keys, store.epoch()
        publish_stage(app, saga_id, name, gen, specs, data, first=k == 0, redact=secrets, epoch=epoch, plan=raw["ph"])
    elif status == SagaStatus.COMPENSATING.value:
        for spec in plan.steps:
            if raw.get(f"cs:{spec.name}") == dispatched:
                publish_compensation(app, saga_id, raw, plan, spec.name, epoch=store.epoch())
    elif raw.get("cbs") != "1" and time.time() * 1000 - int(raw.get("status_at") or 0) > _SENDING_MS:
        completed = status == SagaStatus.COMPLETED.value
        which, key = ("on_complete", "cb_ok") if completed else ("on_failure", "cb_fail")
        _call_back(app, store, saga_id, gen, name, which, raw.get(key, ""), lambda: raw)
