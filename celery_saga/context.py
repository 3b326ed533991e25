"""Inside a step: ``current_step()`` and the `StepContext` it returns.

The step wrapper sets it around a step's or compensation's function; user
code reads it, e.g. for the idempotency key to pass to a payment API.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["StepContext", "current_step", "reset_current", "set_current"]


@dataclass(frozen=True)
class StepContext:
    """Where the running code is, inside a saga.

    Attributes:
        saga_id: The saga.
        saga_name: Its name.
        step: The step name.
        compensating: True inside the step's compensation.
        idempotency_key: Stable across retries and redeliveries of this step or
            compensation, and different between the two. Pass it to external
            services, e.g. as a payment API's idempotency header.
        attempt: 1 for the first execution, counting retries and redeliveries.
        round: The compensation round: 1 for the rollback, 2 for a step that
            succeeded after it had been compensated blind. 1 in a forward step.
        result_known: False when ``step_result`` says nothing: in a blind
            compensation (the step's outcome was unknown: it timed out, was
            cancelled, or its worker was lost), and for a failed step
            compensated under ``compensate_on_failure``. Look the effect up,
            e.g. by ``forward_key``.
        forward_key: The idempotency key the forward step ran with.
        beat: What `heartbeat` calls: set by the step wrapper (which knows
            the app and its store), None outside a worker.
    """

    saga_id: str
    saga_name: str
    step: str
    compensating: bool
    idempotency_key: str
    attempt: int
    round: int = 1
    result_known: bool = True
    forward_key: str = ""
    beat: Callable[[StepContext], bool] | None = field(default=None, compare=False, repr=False)

    def heartbeat(self) -> bool:
        """Tell the saga this step still makes progress (for a step with ``heartbeat_timeout``).

        A step RUNNING with no heartbeat for its ``heartbeat_timeout`` is
        declared lost, even though its worker is alive. At most one Redis call
        per ``heartbeat_timeout / 3`` seconds: call it as often as you like,
        from any thread of the step. Returns False once this attempt no longer
        runs in the record's eyes (it was declared lost, say): its outcome
        will count as late. A compensation's heartbeat does nothing.
        """
        return True if self.beat is None else self.beat(self)


_CURRENT: contextvars.ContextVar[StepContext | None] = contextvars.ContextVar("celery_saga_step", default=None)


def current_step() -> StepContext | None:
    """The saga step being executed, or None outside a saga step or compensation."""
    return _CURRENT.get()


def set_current(ctx: StepContext | None) -> contextvars.Token[StepContext | None]:
    """Enter a step (the wrapper); returns the token to leave it with."""
    return _CURRENT.set(ctx)


def reset_current(token: contextvars.Token[StepContext | None]) -> None:
    """Leave the step entered with ``token``."""
    _CURRENT.reset(token)
