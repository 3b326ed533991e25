"""The plan of a saga: its stages and steps, as stored in every saga record.

The plan travels with the record so that any worker, even one without the
saga's code, can dispatch the next stage or compensate a step.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from . import codec

__all__ = ["FORBIDDEN_IN_STEP_NAMES", "Plan", "StepSpec", "cached_plan", "remember_plan"]

# Step names end up in Celery task ids ("<saga_id>:<step>") and in the
# flat stage list the Lua scripts split on "," and ";".
FORBIDDEN_IN_STEP_NAMES = frozenset(" \t\r\n:;,")


@dataclass(frozen=True)
class StepSpec:
    """One step of a saga.

    Attributes:
        name: The step name, unique in its saga.
        task: Celery task name of the forward action.
        compensation: Task name of the compensation, or None for nothing to undo.
        compensate_on_failure: Compensate this step even when it failed itself.
        bound: Keyword arguments bound in the step's signature; they override saga data.
        options: Publish options (queue, routing_key, exchange, priority).
        stage: Index of the stage this step belongs to.
        compensation_options: Publish options of the compensation.
        timeout: Seconds from dispatch to a recorded outcome, and for each
            compensation attempt; None for no deadline.
        redact: Keys whose values are masked wherever the step's and its
            compensation's arguments are shown (Flower, events, logs, views).
        event: For a wait (``wait_for``), named ``wait:<event>``: the event
            it waits for. A wait has no task and is never published.
        reject: For a wait: the event that rejects it, if any.
        child: For a child saga (a ``Saga`` used as a step, named after
            it): its name. Its task starts the child, and its compensation
            rolls the child back as a unit.
        heartbeat_timeout: Seconds a running step may go without a
            ``current_step().heartbeat()`` before it is lost; None for none.
    """

    name: str
    task: str
    compensation: str | None
    compensate_on_failure: bool = False
    bound: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    stage: int = 0
    compensation_options: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    redact: tuple[str, ...] = ()
    event: str | None = None
    reject: str | None = None
    child: str | None = None
    heartbeat_timeout: float | None = None

    @property
    def is_wait(self) -> bool:
        return self.event is not None

    def to_json(self) -> dict[str, Any]:
        # (Only waits and children carry their own keys: the plans of other sagas keep their digests.)
        if self.event is not None:
            return {"name": self.name, "event": self.event, "reject": self.reject, "timeout": self.timeout}
        if self.child is not None:
            return {"name": self.name, "child": self.child, "task": self.task, "compensation": self.compensation}
        spec = {
            "name": self.name,
            "task": self.task,
            "compensation": self.compensation,
            "compensate_on_failure": self.compensate_on_failure,
            "bound": self.bound,
            "options": self.options,
            "compensation_options": self.compensation_options,
            "timeout": self.timeout,
            "redact": list(self.redact),
        }
        # Only when set: the plans without one keep their digests (and stored plans parse as before).
        if self.heartbeat_timeout is not None:
            spec["heartbeat_timeout"] = self.heartbeat_timeout
        return spec


@dataclass(frozen=True)
class Plan:
    """Stages of steps: one step per stage runs in sequence, several run in parallel."""

    stages: tuple[tuple[StepSpec, ...], ...]

    @property
    def steps(self) -> tuple[StepSpec, ...]:
        return tuple(s for stage in self.stages for s in stage)

    def step(self, name: str) -> StepSpec:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> str:
        return codec.dumps([[s.to_json() for s in stage] for stage in self.stages], sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = codec.loads(text)
        if not isinstance(raw, list):
            raise ValueError("plan is not a list of stages")
        stages = []
        for k, stage in enumerate(raw):
            stages.append(
                tuple(
                    StepSpec(
                        name=str(s["name"]),
                        task=str(s.get("task", "")),
                        compensation=s.get("compensation"),
                        compensate_on_failure=bool(s.get("compensate_on_failure", False)),
                        bound=dict(s.get("bound") or {}),
                        options=dict(s.get("options") or {}),
                        stage=k,
                        compensation_options=dict(s.get("compensation_options") or {}),
                        timeout=float(s["timeout"]) if s.get("timeout") is not None else None,
                        redact=tuple(str(k) for k in s.get("redact") or ()),
                        event=str(s["event"]) if s.get("event") else None,
                        reject=str(s["reject"]) if s.get("reject") else None,
                        child=str(s["child"]) if s.get("child") else None,
                        heartbeat_timeout=(
                            float(s["heartbeat_timeout"]) if s.get("heartbeat_timeout") is not None else None
                        ),
                    )
                    for s in stage
                )
            )
        return cls(tuple(stages))

    def lua_stages(self) -> str:
        """The stage layout the Lua scripts read: members by ",", stages by ";"."""
        return ";".join(",".join(s.name for s in stage) for stage in self.stages)

    def shortest_timeout(self) -> float | None:
        """The shortest step timeout, None if no step has one."""
        timeouts = [s.timeout for s in self.steps if s.timeout is not None]
        return min(timeouts) if timeouts else None

    @cached_property
    def redacted_keys(self) -> frozenset[str]:
        """Every key any step masks: a secret of one step is a secret of the saga."""
        return frozenset(k for s in self.steps for k in s.redact)

    def digest(self) -> str:
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:16]


# Plans by digest. A plan never changes under its digest, so workers decode
# each one once, not once per step; threads pools share the cache.
_PLANS: OrderedDict[str, Plan] = OrderedDict()
_PLANS_LOCK = threading.Lock()
_PLANS_KEPT = 512


def remember_plan(digest: str, plan: Plan) -> Plan:
    """Cache ``plan`` under ``digest``, keeping the most recent few hundred."""
    with _PLANS_LOCK:
        _PLANS[digest] = plan
        _PLANS.move_to_end(digest)
        if len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)
    return plan


def cached_plan(digest: str, load: Callable[[], str]) -> Plan:
    """The plan with ``digest``, decoded from ``load()`` (its JSON) only when not cached."""
    plan = _PLANS.get(digest)
    if plan is None:
        plan = remember_plan(digest, Plan.from_json(load()))
    return plan
