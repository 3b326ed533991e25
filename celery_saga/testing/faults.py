"""Fault injection into steps and compensations by step name: `SagaFaults`, the ``saga_faults`` fixture."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass

from celery import Celery
from celery.exceptions import TimeLimitExceeded

from ..context import StepContext
from ..registry import sagas_of

__all__ = ["SagaFaults"]


@dataclass
class _Fault:
    step: str
    compensating: bool
    error: Exception | type[Exception]
    times: int | None
    saga: str | None
    fired: int = 0


class SagaFaults:
    """Faults injected into steps and compensations by step name: the ``saga_faults`` fixture.

    A fault is raised right before the step's (or compensation's) function
    runs, where the function's own exception would come from: the task's
    ``autoretry_for`` retries it like a real one. ``times=None``
    means every time; ``saga`` limits a fault to the sagas of that name.

    With ``app``, a step name that no saga of the app has (a typo would make
    a test pass for the wrong reason) raises ValueError naming the known steps.
    """

    def __init__(self, app: Celery | None = None) -> None:
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        self._app = app

    def fail(
        self,
        step: str,
        exc: Exception | type[Exception] | None = None,
        *,
        times: int | None = None,
        saga: str | None = None,
    ) -> None:
        """Make the step fail with ``exc``, by default a RuntimeError saying it was injected."""
        self._add(_Fault(step, False, exc or RuntimeError(f"injected failure of step {step}"), times, saga))

    def timeout(self, step: str, *, times: int | None = None, saga: str | None = None) -> None:
        """Make the step time out the way a hard time limit does: cut off mid-way.

        Its outcome is unknown, so the step is recorded UNKNOWN and
        compensated blind (``step_result=None``), and the saga's ``reason``
        is ``"timeout"``. To test a step that misses its deadline instead,
        give it a short ``timeout=`` and make it wait.
        """
        self._add(_Fault(step, False, TimeLimitExceeded(f"injected timeout of step {step}"), times, saga))

    def fail_compensation(
        self,
        step: str,
        times: int | None = None,
        *,
        exc: Exception | type[Exception] | None = None,
        saga: str | None = None,
    ) -> None:
        """Make the step's compensation fail ``times`` times (None: always); then it runs normally."""
        error = exc or RuntimeError(f"injected failure of the compensation of {step}")
        self._add(_Fault(step, True, error, times, saga))

    def fired(self, step: str, compensating: bool = False) -> int:
        """How many faults were injected into the step, or its compensation, so far."""
        with self._lock:
            return sum(f.fired for f in self._faults if f.step == step and f.compensating == compensating)

    def _add(self, fault: _Fault) -> None:
        if fault.times is not None and fault.times < 1:
            raise ValueError(f"times must be None (always) or at least 1, not {fault.times!r}")
        if self._app is not None:
            self._check(fault)
        with self._lock:
            self._faults.append(fault)

    def _check(self, fault: _Fault) -> None:
        assert self._app is not None
        app = self._app
        app.tasks  # noqa: B018 - finalizes the app: sagas of shared tasks belong to it from then on
        plans = {saga.name: saga.plan() for saga in sagas_of(app)}
        if fault.saga is not None:
            if fault.saga not in plans:
                raise ValueError(f"saga_faults: app {app.main!r} has no saga {fault.saga!r}; sagas: {sorted(plans)}")
            plans = {fault.saga: plans[fault.saga]}
        specs = [spec for plan in plans.values() for spec in plan.steps]
        named = [spec for spec in specs if spec.name == fault.step]
        if not named:
            where = f"saga {fault.saga!r}" if fault.saga else f"any saga of app {app.main!r}"
            known = sorted({spec.name for spec in specs}) or "none (is the module that defines the sagas imported?)"
            raise ValueError(
                f"saga_faults: {fault.step!r} is not a step of {where}, so nothing would be injected; steps: {known}"
            )
        if fault.compensating and all(spec.compensation is None for spec in named):
            raise ValueError(f"saga_faults: step {fault.step!r} has no compensation to fail (compensate=None)")

    def __call__(self, ctx: StepContext) -> None:
        """The worker's fault hook: raise the first fault that matches ``ctx`` and has not run out."""
        with self._lock:
            for f in self._faults:
                matches = (f.step, f.compensating) == (ctx.step, ctx.compensating) and f.saga in (None, ctx.saga_name)
                if matches and (f.times is None or f.fired < f.times):
                    f.fired += 1
                    break
            else:
                return
        # A copy each time: one exception raised in several threads would share a traceback.
        raise copy.copy(f.error) if isinstance(f.error, Exception) else f.error()
