"""Publishing saga messages, and acting on what a transition decided.

Whoever makes a transition publishes what it calls for: the last step of a
stage publishes the next stage, the step that fails publishes the first
compensations. Publishing happens after the transition, so it is
at-least-once: a redelivered copy of a message re-drives what its first copy
may not have published (``redrive``), and receivers de-duplicate.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from .announce import compensation_attempt_failed, saga_transition
from .plan import Plan, StepSpec
from .settings import backoff_delay
from .state import data_before
from .store.base import SagaStore, Transition

__all__ = ["Headers", "publish_step", "react", "redrive"]

logger = logging.getLogger("celery_saga")

FINISHED = frozenset({"COMPLETED", "COMPENSATED", "FAILED"})


class Headers:
    """Names of the message headers that carry the saga context."""

    ID = "saga_id"
    NAME = "saga_name"
    STEP = "saga_step"
    GEN = "saga_gen"
    UNDO = "saga_undo"
    BOUND = "saga_bound"
    BACKOFF = "saga_backoff"
    FIRST = "saga_first"
    ROUND = "saga_round"
    KNOWN = "saga_known"


def task_id(saga_id: str, step: str, undo: bool = False, round: int = 1) -> str:
    """Deterministic Celery task id, also the idempotency key the function sees.

    Duplicates of one message share it, and Flower finds it by saga id:
    ``<saga>:<step>``, ``<saga>:<step>:undo``, ``<saga>:<step>:undo:2``.
    """
    if not undo:
        return f"{saga_id}:{step}"
    return f"{saga_id}:{step}:undo" if round == 1 else f"{saga_id}:{step}:undo:{round}"


def parse_task_id(tid: str | None) -> tuple[str, str, int] | None:
    """(saga_id, step, round) of a saga task id, round 0 for the forward step; None for other ids."""
    parts = (tid or "").split(":")
    if len(parts) == 2:
        return parts[0], parts[1], 0
    if len(parts) == 3 and parts[2] == "undo":
        return parts[0], parts[1], 1
    if len(parts) == 4 and parts[2] == "undo" and parts[3].isdigit():
        return parts[0], parts[1], int(parts[3])
    return None


@dataclass(frozen=True)
class Due:
    """A compensation a transition asks for: ``step[:round]``, then ``@n`` or ``!n``.

    ``attempt`` is 0 for "send now"; else attempt ``attempt`` missed its
    deadline, and the compensation is sent again after that attempt's retry
    backoff, or, with ``gave_up``, not at all.
    """

    step: str
    round: int
    attempt: int
    gave_up: bool

    @classmethod
    def parse(cls, entry: str) -> Due:
        gave_up = "!" in entry
        ref, _, attempt = entry.replace("!", "@").partition("@")
        step, _, round_ = ref.partition(":")
        return cls(step, int(round_ or 1), int(attempt or 0), gave_up)


_PLANS: OrderedDict[str, Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()


def cached_plan(digest: str, load: Any) -> Plan:
    """Plans by digest; workers decode each plan once, not once per step."""
    plan = _PLANS.get(digest)
    if plan is None:
        plan = Plan.from_json(load())
        with _PLANS_LOCK:  # threads pools share it
            _PLANS[digest] = plan
            if len(_PLANS) > 512:
                _PLANS.popitem(last=False)
    return plan


def publish_step(
    app: Celery, saga_id: str, saga_name: str, gen: str, spec: StepSpec, data: dict[str, Any], first: bool = False
) -> None:
    """Send one forward step as the user's own task, with the saga context in its headers."""
    options = dict(spec.options)
    if spec.timeout is not None:
        # A worker drops the message once its deadline has passed (Celery
        # reports it revoked-expired, which the saga records as a timeout of
        # a step that never started); the record's deadline decides anyway.
        # A number is seconds from now for Celery, not an epoch time.
        options["expires"] = spec.timeout
    app.send_task(
        spec.task,
        args=(),
        kwargs=data,
        task_id=task_id(saga_id, spec.name),
        root_id=saga_id,
        headers={
            Headers.ID: saga_id,
            Headers.NAME: saga_name,
            Headers.STEP: spec.name,
            Headers.GEN: gen,
            Headers.UNDO: 0,
            Headers.BOUND: spec.bound,
            Headers.FIRST: int(first),
        },
        # The saga record holds every result; a result-backend write per step
        # would only cost a round trip.
        ignore_result=True,
        serializer="json",
        **options,
    )


def publish_compensation(
    app: Celery,
    saga_id: str,
    raw: dict[str, str],
    plan: Plan,
    step: str,
    countdown: float | None = None,
    round: int = 1,
) -> None:
    """Send the compensation of ``step``.

    Round 1 carries the result the record has (None if the outcome is
    unknown); round 2 the late result of a step that was compensated blind.
    """
    spec = plan.step(step)
    assert spec.compensation is not None
    kwargs = data_before(plan, raw, spec.stage, json.loads(raw["kwargs"]))
    kwargs.update(spec.bound)
    if round == 2:
        result_raw, known = raw.get(f"lr:{step}"), True
    else:
        known = raw.get(f"s:{step}") == "COMPLETED"
        result_raw = raw.get(f"r:{step}") if known else None
    kwargs["step_result"] = json.loads(result_raw) if result_raw is not None else None
    settings = json.loads(raw.get("settings") or "{}")
    app.send_task(
        spec.compensation,
        args=(),
        kwargs=kwargs,
        task_id=task_id(saga_id, step, undo=True, round=round),
        root_id=saga_id,
        countdown=countdown,
        headers={
            Headers.ID: saga_id,
            Headers.NAME: raw.get("name", ""),
            Headers.STEP: step,
            Headers.GEN: raw.get("gen", ""),
            Headers.UNDO: 1,
            Headers.ROUND: round,
            Headers.KNOWN: int(known),
            Headers.BACKOFF: [
                settings.get("compensation_retry_backoff", 1.0),
                settings.get("compensation_retry_backoff_max", 600.0),
            ],
        },
        ignore_result=True,
        serializer="json",
        **spec.compensation_options,
    )


def send_callback(app: Celery, store: SagaStore, saga_id: str, name: str, gen: str, which: str, sig_json: str) -> None:
    """Send on_complete / on_failure with the saga id first; its task id makes a resend a duplicate."""
    if not sig_json:
        return
    sig = app.signature(json.loads(sig_json))
    sig.apply_async(args=(saga_id,), task_id=f"{saga_id}:{which}", root_id=saga_id)
    store.step("cbsent", saga_id, gen, name)


def react(
    app: Celery,
    store: SagaStore,
    saga_id: str,
    name: str,
    gen: str,
    t: Transition,
) -> None:
    """Publish what transition ``t`` calls for, and announce a change of saga status."""
    raw: dict[str, str] | None = None

    def load() -> dict[str, str]:
        nonlocal raw
        if raw is None:
            raw = store.load(saga_id)
        return raw

    # Announce first: the messages published next lead to later events
    # (e.g. "compensated"), which must not overtake this one.
    if t.changed_from:
        saga_transition(app, saga_id, name, t, load)
    _publish(app, store, saga_id, name, gen, t, load)


def _publish(
    app: Celery, store: SagaStore, saga_id: str, name: str, gen: str, t: Transition, load: Callable[[], dict[str, str]]
) -> None:
    if t.tag == "next":
        digest, k, kwargs_raw, results = t.extra[0], int(t.extra[1]), t.extra[2], t.extra[3:]
        plan = cached_plan(digest, lambda: store.load(saga_id)["plan"])
        merged = json.loads(kwargs_raw)
        for result_raw in results:
            result = json.loads(result_raw)
            if isinstance(result, dict):
                merged.update(result)
        for spec in plan.stages[k]:
            publish_step(app, saga_id, name, gen, spec, merged)
        return
    if t.tag == "completed":
        if t.extra and t.extra[0]:
            send_callback(app, store, saga_id, name, gen, "on_complete", t.extra[0])
        return
    if t.tag in ("compensate", "fenced", "gaveup", "retry", "late", "swept"):
        due = t.extra[1:] if t.tag == "retry" else t.extra[2:] if t.tag == "swept" else t.extra
        ended = bool(t.changed_from) and t.status in FINISHED
        if not due and not ended:
            return
        raw = load()
        plan = cached_plan(raw["ph"], lambda: raw["plan"])
        settings = json.loads(raw.get("settings") or "{}")
        for entry in due:
            d = Due.parse(entry)
            if d.attempt:
                # A missed deadline counts as a failed attempt, and is announced as one.
                error = raw.get(f"ce:{d.step}" if d.round == 1 else f"ce2:{d.step}") or "timeout"
                compensation_attempt_failed(saga_id, name, d.step, d.attempt, error, d.gave_up, d.round)
            if not d.gave_up:
                countdown = backoff_delay(settings, d.attempt) if d.attempt else None
                publish_compensation(app, saga_id, raw, plan, d.step, countdown=countdown, round=d.round)
        if ended:
            send_callback(app, store, saga_id, name, gen, "on_failure", raw.get("cb_fail", ""))


def redrive(app: Celery, store: SagaStore, saga_id: str) -> None:
    """Re-publish whatever the record says was dispatched, for a copy whose first run may have died.

    Receivers skip copies of a step that is already running or done, so a
    needless re-publish costs a message, never a second effect.
    """
    raw = store.load(saga_id)
    plan = cached_plan(raw["ph"], lambda: raw["plan"])
    status, name, gen = raw["status"], raw.get("name", ""), raw.get("gen", "")
    if status in ("PENDING", "RUNNING"):
        k = int(raw.get("stage", "0"))
        data = data_before(plan, raw, k, json.loads(raw["kwargs"]))
        for spec in plan.stages[k]:
            if raw.get(f"s:{spec.name}") == "DISPATCHED":
                publish_step(app, saga_id, name, gen, spec, data, first=k == 0)
    elif status == "COMPENSATING":
        for spec in plan.steps:
            if raw.get(f"cs:{spec.name}") == "DISPATCHED":
                publish_compensation(app, saga_id, raw, plan, spec.name)
    elif raw.get("cbs") != "1":
        which, cb = (
            ("on_complete", raw.get("cb_ok", "")) if status == "COMPLETED" else ("on_failure", raw.get("cb_fail", ""))
        )
        send_callback(app, store, saga_id, name, gen, which, cb)
