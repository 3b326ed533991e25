"""Waiting for something outside the saga: ``wait_for``, a stage item that holds no worker."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import SagaDefinitionError
from .plan import FORBIDDEN_IN_STEP_NAMES
from .registry import MISSING
from .settings import timeout_seconds

__all__ = ["WAIT_PREFIX", "WaitRef", "check_event_name", "wait_for"]

#: A wait is a step named ``wait:<event>``; no task can have that step name (":" is not allowed in one).
WAIT_PREFIX = "wait:"


@dataclass(frozen=True)
class WaitRef:
    """A wait for the outside event ``event``, for at most ``timeout`` seconds (None: forever).

    Delivering ``reject`` instead rolls the saga back (reason ``"rejected"``).
    """

    event: str
    timeout: float | None
    reject: str | None = None

    @property
    def step_name(self) -> str:
        return f"{WAIT_PREFIX}{self.event}"

    def __repr__(self) -> str:
        reject = f", reject={self.reject!r}" if self.reject else ""
        return f"wait_for({self.event!r}, timeout={self.timeout!r}{reject})"


def check_event_name(event: Any, what: str = "event name") -> str:
    """``event``, if it can name an event (it ends up in step names, the record and task ids)."""
    if not isinstance(event, str) or not event or set(event) & FORBIDDEN_IN_STEP_NAMES:
        raise SagaDefinitionError(
            f"{what} must be a non-empty string without whitespace, ':', ';' or ',', not {event!r}"
        )
    return event


def wait_for(event: str, timeout: Any = MISSING, reject: str | None = None) -> WaitRef:
    """A stage item that waits, holding no worker, until ``event`` is delivered to the saga.

    Use it wherever a step may stand, also in ``parallel(...)``::

        Saga("refund", [reserve, wait_for("approval", timeout=86400, reject="denied"), pay])

    The event is delivered by ``SagaResult.signal()``, ``signal_saga()`` or
    ``celery saga signal``; a dict of data that comes with it is merged into
    the saga data like a step's result. An event delivered before the saga
    gets to its wait is kept, and consumed when it does.

    Args:
        event: The event's name.
        timeout: Seconds to wait; then the saga rolls back with reason
            ``"timeout"``, as for a step. Required: write ``timeout=None`` to
            wait forever.
        reject: Another event's name, whose delivery rolls the saga back
            with reason ``"rejected"``.

    Raises:
        SagaDefinitionError: a name cannot be used, or ``timeout`` is missing or not seconds.
    """
    check_event_name(event)
    if timeout is MISSING:
        raise SagaDefinitionError(
            f"wait_for({event!r}) needs timeout=<seconds>, after which the saga rolls back; "
            f"write timeout=None to wait forever"
        )
    seconds = timeout_seconds(f"wait_for({event!r}): timeout", timeout)
    if reject is not None:
        check_event_name(reject, f"wait_for({event!r}): reject")
        if reject == event:
            raise SagaDefinitionError(f"wait_for({event!r}): reject must name another event than the one awaited")
    return WaitRef(event, seconds, reject)
