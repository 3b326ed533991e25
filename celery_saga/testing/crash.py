"""Exploring a saga under a worker killed at each crash point: the ``saga_crash_points`` fixture.

`CrashExplorer.explore` runs the saga once without faults, to learn which
steps and compensations run and how long they take. From that run it lists
the crash points (`CrashPoint`) of every step and compensation attempt that
ran. Then, for each point, it starts the saga again under a fresh id on a
``celery worker`` process (`crash_worker`) that SIGKILLs its whole process
group when that saga reaches that point. A new worker takes over, the saga
finishes or not within ``timeout``, and the user's invariant judges the
result. Every run's outcome goes into a `CrashReport`.

With ``restart=`` the killed worker is the only one, and comes back as a
supervisor would restart it: under the same node name (its new instance
declares the dead one lost at once) or a new one (the dead instance is lost
once it has been silent for ``saga_worker_lost_after``). The workers then
write their liveness every `RESTART_HEARTBEAT` seconds, so that what ran on
the dead worker is found by worker liveness, not at its deadline.

Workers are chained to save a start per run: the worker that recovers run N
is already armed for run N + 1, which starts once run N has finished. A
worker dies only for the saga id it was armed for, so a late copy of an
earlier run's message never kills it.

PYTEST_DONT_REWRITE: invariants raise their own AssertionErrors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import redis
from celery import Celery

from ..result import SagaResult
from ..saga import Saga
from ..state import SagaState, SagaStatus, StepRecord
from ..views import render_timeline, table
from ..worker.wrapper import CrashPoint
from . import crash_worker
from .crash_worker import CrashAt
from .setup import app_queues, configured, delete_keys, isolated_settings

__all__ = ["DEPTHS", "RESTARTS", "CrashExplorer", "CrashReport", "ExploredPoint", "Restart", "SkippedPoint"]

Kind = Literal["step", "compensation"]
#: How the killed worker comes back in `CrashExplorer.explore`'s ``restart=`` case.
Restart = Literal["same-name", "new-name"]
RESTARTS: tuple[Restart, ...] = ("same-name", "new-name")

#: The points each ``--saga-crash-points`` depth explores.
DEPTHS: dict[str, tuple[CrashPoint, ...]] = {
    "quick": (CrashPoint.RUNNING, CrashPoint.RETURNED),
    "full": tuple(CrashPoint),
}

# A worker asked to stop (SIGTERM: finish what runs, ack, exit) gets this long
# before its process group is SIGKILLed.
_STOP_WITHIN = 10.0

#: In the ``restart=`` case, seconds between the workers' liveness writes (``saga_worker_heartbeat``)
RESTART_HEARTBEAT = 0.5
#: and the silence after which a worker instance is lost (``saga_worker_lost_after``). Four missed
#: writes, not the default three: one worker on busy cores must not be declared lost while alive.
RESTART_LOST_AFTER = 2.0


@dataclass(frozen=True)
class ExploredPoint:
    """One run of the saga with a worker killed at one point (or, for the baseline, none)."""

    step: str
    kind: Kind | Literal["none"]
    number: int
    saga_id: str
    #: How the saga ended; None if it did not finish within the run's timeout.
    status: SagaStatus | None
    #: From the start of the saga to its end (or to the timeout).
    seconds: float
    #: Why the run failed: the invariant's error, or why the saga did not finish. None: it passed.
    error: str | None = None
    #: For a step's point: why the saga stopped waiting for the killed step (`StepRecord.stopped_by`:
    #: ``"lost"`` when worker liveness found it, ``"timeout"`` at its deadline); None if it did not
    #: (it ran again, or had ended).
    stopped_by: str | None = None

    @property
    def label(self) -> str:
        if self.kind == "none":
            return "no crash"
        return f"{self.step} ({self.kind}) point {self.number}"


@dataclass(frozen=True)
class SkippedPoint:
    """A point listed from the baseline run that the run for it did not reach."""

    step: str
    kind: Kind
    number: int
    why: str


@dataclass(frozen=True)
class CrashReport:
    """What `CrashExplorer.explore` found."""

    saga: str
    depth: str
    #: The run without faults the points were listed from (the invariant is not called for it).
    baseline: ExploredPoint
    #: Every point explored (reached), in the order they were explored.
    points: tuple[ExploredPoint, ...]
    skipped: tuple[SkippedPoint, ...]
    #: What the explorer changed for its runs (deadlines, visibility timeout), and why.
    notes: tuple[str, ...]
    seconds: float
    #: Where the workers' logs are.
    log_dir: str = ""
    #: How the killed worker came back: None (a new worker took over at once), or the ``restart=`` case.
    restart: Restart | None = None

    @property
    def failures(self) -> tuple[ExploredPoint, ...]:
        """The runs that did not finish, or whose invariant raised (the baseline, if it did not finish)."""
        return tuple(p for p in (self.baseline, *self.points) if p.error is not None)

    @property
    def ok(self) -> bool:
        """True if every run finished and passed the invariant."""
        return not self.failures

    def summary(self) -> str:
        """A table of every run, then each failure's error, the skipped points and the notes."""
        rows = [
            [
                p.label,
                p.status.value if p.status else "-",
                p.stopped_by or "-",
                f"{p.seconds:.1f}s",
                ("not judged" if p.kind == "none" else "ok") if p.error is None else "FAILED",
                p.saga_id,
            ]
            for p in (self.baseline, *self.points)
        ]
        verdict = "ok" if self.ok else f"{len(self.failures)} failed"
        how = self.depth if self.restart is None else f"{self.depth}, its only worker restarted ({self.restart})"
        lines = [
            f"saga {self.saga}: {len(self.points)} crash points explored ({how}) in {self.seconds:.0f}s: {verdict}",
            table(["point", "end", "stopped by", "took", "invariant", "saga id"], rows),
        ]
        for p in self.failures:
            lines += ["", f"FAILED at {p.label}:", *("  " + line for line in (p.error or "").splitlines())]
        for s in self.skipped:
            lines.append(f"skipped {s.step} ({s.kind}) point {s.number}: {s.why}")
        lines += [f"note: {n}" for n in self.notes]
        if self.log_dir:
            lines.append(f"worker logs: {self.log_dir}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Point:
    step: str
    compensating: bool
    number: CrashPoint

    @property
    def kind(self) -> Kind:
        return "compensation" if self.compensating else "step"


PointSpec = str | int | tuple[str, int] | tuple[str, int, str]


class CrashExplorer:
    """The ``saga_crash_points`` fixture: explores sagas under workers killed at their crash points.

    Args:
        redis_url: The Redis of the runs' broker, result backend and saga
            store; each `explore` keeps its keys under a fresh prefix and
            deletes them after.
        depth: ``"quick"`` (points 2 and 3) or ``"full"`` (all four).
        log_dir: Where the workers log; a temporary directory if None.
    """

    def __init__(self, redis_url: str, depth: str = "quick", log_dir: str | Path | None = None) -> None:
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, not {depth!r}")
        self.redis_url, self.depth = redis_url, depth
        self.log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="saga-crash-"))

    def explore(
        self,
        saga: Saga,
        kwargs: dict[str, Any] | Callable[[int], dict[str, Any]],
        invariant: Callable[[SagaResult], Any],
        *,
        app: Celery | None = None,
        app_path: str | None = None,
        timeout: float = 60.0,
        points: Iterable[PointSpec] | Mapping[str, Iterable[int]] | None = None,
        depth: str | None = None,
        concurrency: int = 1,
        restart: Restart | None = None,
        reset: Callable[[], Any] | None = None,
    ) -> CrashReport:
        """Run ``saga`` with a worker killed at each of its crash points; check ``invariant`` after each run.

        Args:
            saga: The saga to explore.
            kwargs: Its data: a dict, the same for every run, or a function
                of the run's number (0 for the baseline, then 1, 2 ...), so
                that runs need not share rows (an order id per run, say).
            invariant: Called with the `SagaResult` of each finished run; an
                exception it raises (AssertionError) fails that point.
            app: The app to start the saga on; the saga's own by default.
            app_path: The ``-A`` of the workers; by default the module that defined the saga.
            timeout: Seconds each run may take to finish after its crash.
            points: Restricts the points: a step name (its points at this
                depth), a point number (of every step), ``(step, number)``,
                or ``(step, number, "step" | "compensation")``; or a mapping
                of step names to point numbers, ``{"charge": [2, 3]}``.
                Points named with their number are explored at any depth.
            depth: ``"quick"`` or ``"full"``; the fixture's (``--saga-crash-points``) by default.
            concurrency: Pool processes of each worker (prefork; default 1).
            reset: Called before each run, the baseline's included, to put
                what the invariant reads back as it was.
            restart: None: a new worker takes over at once, and the runs
                keep the app's worker liveness settings, so what the killed
                worker ran is settled by the (capped) deadlines or a
                redelivery. ``"same-name"``: the killed worker was the only
                one, and nothing runs until it is started again under the
                same node name, whose new instance declares the dead one lost
                at once. ``"new-name"``: the same, but it comes back under a
                new node name, so the dead instance is lost only after
                ``saga_worker_lost_after``. Both write liveness every
                `RESTART_HEARTBEAT` seconds.
        """
        depth = depth or self.depth
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, not {depth!r}")
        if restart is not None and restart not in RESTARTS:
            raise ValueError(f"restart must be None or one of {list(RESTARTS)}, not {restart!r}")
        app = app or saga.app
        app_path = app_path or saga.module
        if not app_path or app_path == "__main__":
            raise ValueError(f"saga {saga.name!r}: pass app_path=, the module its workers import (celery -A)")
        specs = None if points is None else _specs(points)
        names = sorted(spec.name for spec in saga.plan().steps)
        for spec in specs or ():
            if _step_of(spec) not in (None, *names):
                raise ValueError(f"points=: {spec!r} names no step of saga {saga.name!r}; steps: {names}")
        data = kwargs if callable(kwargs) else (lambda _run, fixed=kwargs: fixed)
        with _Run(self, saga, app, app_path, depth, concurrency, restart) as run:
            return run.explore(data, invariant, timeout, specs, reset)


class _Workers:
    """The ``celery worker`` processes of one exploration; each leads its own process group."""

    def __init__(self, app_path: str, settings: dict[str, Any], args: list[str], log_dir: Path) -> None:
        self.app_path, self.settings, self.args, self.log_dir = app_path, settings, args, log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        #: The node name of every worker started from now on; None: a new one each.
        self.node: str | None = None
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}

    def start(self, crash: CrashAt | None) -> subprocess.Popen[bytes]:
        spec = {"app": self.app_path, "settings": self.settings, "crash": crash.to_json() if crash else None}
        n = len(self.procs) + 1
        node = self.node or f"saga-crash-{n}-{uuid.uuid4().hex[:6]}@%h"
        args = [json.dumps(spec), *self.args, "-n", node]
        with open(self.log_path(n), "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", crash_worker.__name__, *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def log_path(self, n: int) -> Path:
        return self.log_dir / f"worker-{n}.log"

    def log_tail(self, proc: subprocess.Popen[bytes], lines: int = 15) -> str:
        path = self.log_path(self.procs.index(proc) + 1)
        text = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(text[-lines:])

    @staticmethod
    def kill_group(proc: subprocess.Popen[bytes]) -> None:
        # The group is the worker's own (start_new_session): its pool children too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(_STOP_WITHIN)
            except subprocess.TimeoutExpired:
                self.kill_group(proc)
                proc.wait(_STOP_WITHIN)
        self.kill_group(proc)

    def close(self) -> None:
        for proc in self.procs:
            self.stop(proc)


class _Run:
    """One `CrashExplorer.explore` call: its prefix, its workers, and its runs."""

    def __init__(
        self,
        explorer: CrashExplorer,
        saga: Saga,
        app: Celery,
        app_path: str,
        depth: str,
        concurrency: int,
        restart: Restart | None,
    ) -> None:
        self.explorer, self.saga, self.app, self.depth, self.restart = explorer, saga, app, depth, restart
        self.prefix = f"sagacrash-{uuid.uuid4().hex[:10]}"
        self.log_dir = explorer.log_dir / self.prefix
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.app_path, self.concurrency = app_path, concurrency
        self.notes: list[str] = []
        self.client = redis.Redis.from_url(explorer.redis_url)
        self.runs = 0
        self.reset: Callable[[], Any] | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Run:
        self._stack.enter_context(configured(self.app, isolated_settings(self.explorer.redis_url, self.prefix)))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._stack.close()
        finally:
            self.client.close()
            delete_keys(self.explorer.redis_url, self.prefix)

    # -- the exploration ----------------------------------------------------------------

    def explore(
        self,
        kwargs: Callable[[int], dict[str, Any]],
        invariant: Callable[[SagaResult], Any],
        timeout: float,
        specs: list[PointSpec] | None,
        reset: Callable[[], Any] | None = None,
    ) -> CrashReport:
        self.reset = reset
        began = time.monotonic()
        workers = _Workers(self.app_path, {}, [], self.log_dir)
        try:
            # The baseline: a worker that never dies, the user's own deadlines.
            workers.settings, workers.args = self._worker_settings(visibility=None), self._worker_args()
            worker = workers.start(None)
            baseline_id = self.saga.id_for(self._key(0))
            self._reset()
            self.saga.apply_async(kwargs=kwargs(0), idempotency_key=self._key(0))
            # Only listed from, not judged: the invariant is called once per crash run.
            baseline = self._judge("", "none", 0, baseline_id, time.monotonic(), timeout, None)
            state = SagaResult(baseline_id, app=self.app).state()
            if baseline.status is None:
                return self._report(baseline, [], [], began)
            todo = self._select(_points_of(state, DEPTHS[self.depth]), specs, state)
            if not todo:
                return self._report(baseline, [], [], began)
            saga, settings = self._shortened(state)
            workers.stop(worker)
            workers.settings = settings
            if self.restart is not None:
                workers.settings = {**settings, **self._restarting(workers)}
            explored, skipped = self._crash_runs(saga, kwargs, invariant, timeout, todo, workers)
            return self._report(baseline, explored, skipped, began)
        finally:
            workers.close()

    def _crash_runs(
        self,
        saga: Saga,
        kwargs: Callable[[int], dict[str, Any]],
        invariant: Callable[[SagaResult], Any],
        timeout: float,
        todo: list[_Point],
        workers: _Workers,
    ) -> tuple[list[ExploredPoint], list[SkippedPoint]]:
        explored: list[ExploredPoint] = []
        skipped: list[SkippedPoint] = []
        ids = [saga.id_for(self._key(i + 1)) for i in range(len(todo))]
        gates = [f"{self.prefix}:crash-gate:{i + 1}" for i in range(len(todo))]

        def armed(i: int) -> CrashAt | None:
            if i >= len(todo):
                return None
            p = todo[i]
            return CrashAt(ids[i], p.step, p.compensating, p.number, self.explorer.redis_url, gates[i])

        worker = workers.start(armed(0))
        for i, point in enumerate(todo):
            if worker.poll() is not None:  # died outside a crash point; start over with a fresh one
                worker = workers.start(armed(i))
            started = time.monotonic()
            self._reset()
            saga.apply_async(kwargs=kwargs(i + 1), idempotency_key=self._key(i + 1))
            result = SagaResult(ids[i], app=self.app)
            reached = self._until_crash(worker, result, gates[i], started + timeout)
            if reached is None:
                if worker.poll() is None and result.state().status.finished:
                    why = "the saga finished without reaching it (the step or compensation did not run this time)"
                    skipped.append(SkippedPoint(point.step, point.kind, int(point.number), why))
                    # The worker is still armed for this run only: replace it for the next.
                    workers.stop(worker)
                    worker = workers.start(armed(i + 1))
                    continue
                error = (
                    f"the worker died without reaching the point:\n{workers.log_tail(worker)}"
                    if worker.poll() is not None
                    else f"the saga neither reached the point nor finished within {timeout:g}s"
                )
                explored.append(self._failed_run(point, ids[i], result, started, error))
                workers.stop(worker)
                worker = workers.start(armed(i + 1))
                continue
            workers.kill_group(worker)
            worker.wait(_STOP_WITHIN)
            # The worker that recovers this run is already armed for the next one.
            # With restart=, it is the killed one started again: no worker was
            # alive in between, to sweep, take its messages or notice its death.
            worker = workers.start(armed(i + 1))
            explored.append(self._judge(point.step, point.kind, int(point.number), ids[i], started, timeout, invariant))
        workers.stop(worker)
        return explored, skipped

    def _reset(self) -> None:
        if self.reset is not None:
            self.reset()

    def _until_crash(
        self, worker: subprocess.Popen[bytes], result: SagaResult, gate: str, deadline: float
    ) -> int | None:
        """Wait for the worker to die at its point: its PID; None if it did not (the saga finished, time ran out)."""
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                break
            if result.state().status.finished:
                # Dying at point 4 of the last step, the worker has written the
                # end before it reaches the gate: give it a moment to get there.
                got = self.client.blpop([gate], timeout=2)
                return int(got[1]) if got else None
            time.sleep(0.02)
        pid = self.client.lpop(gate)
        return int(pid) if isinstance(pid, bytes) else None

    def _judge(
        self,
        step: str,
        kind: Kind | Literal["none"],
        number: int,
        saga_id: str,
        started: float,
        timeout: float,
        invariant: Callable[[SagaResult], Any] | None,
    ) -> ExploredPoint:
        result = SagaResult(saga_id, app=self.app)
        deadline, pause = started + timeout, 0.01
        while not (state := result.state()).status.finished:
            if time.monotonic() >= deadline:
                error = f"the saga did not finish within {timeout:g}s: it is {state.status.value}\n{_timeline(state)}"
                return ExploredPoint(step, kind, number, saga_id, None, time.monotonic() - started, error)
            time.sleep(pause)
            pause = min(0.1, pause * 2)
        took = time.monotonic() - started
        stopped_by = state.step(step).stopped_by if kind == "step" else None
        if invariant is None:
            return ExploredPoint(step, kind, number, saga_id, state.status, took)
        try:
            invariant(result)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}\n{_timeline(result.state())}"
            return ExploredPoint(step, kind, number, saga_id, state.status, took, error, stopped_by)
        return ExploredPoint(step, kind, number, saga_id, state.status, took, stopped_by=stopped_by)

    def _failed_run(self, point: _Point, saga_id: str, result: SagaResult, started: float, error: str) -> ExploredPoint:
        state = result.state()
        status = state.status if state.status.finished else None
        return ExploredPoint(
            point.step, point.kind, int(point.number), saga_id, status, time.monotonic() - started, error
        )

    # -- what the runs change -----------------------------------------------------------

    def _shortened(self, baseline: SagaState) -> tuple[Saga, dict[str, Any]]:
        """The saga with deadlines the runs can wait for, and the workers' settings to match.

        A killed message comes back after the broker's visibility timeout
        (with ``acks_late``, or if it was only prefetched); a started step
        whose message is lost is settled by its deadline. Both are shortened,
        the visibility timeout to well under the deadlines so that
        redelivery, when it can happen, comes first and is what is tested.
        """
        longest = max((_took(s) for s in baseline.steps), default=0.0)
        visibility = float(max(2, math.ceil(3 * longest)))
        late = self._acks_late()
        cap = 2 * visibility + 2 if late else max(3.0, math.ceil(3 * longest) + 1.0)
        self.notes.append(
            f"step and compensation deadlines capped at {cap:g}s for the crash runs "
            f"(the longest step or compensation of the baseline run took {longest:.2f}s)"
        )
        self.notes.append(
            f"the workers' broker visibility_timeout is {visibility:g}s and they restore unacked messages every "
            f"second: a killed message is redelivered after about {visibility:g}s"
            + ("" if late else " (if it was only prefetched: none of the saga's tasks has acks_late)")
        )
        return self.saga.with_deadlines_at_most(cap), self._worker_settings(visibility)

    def _restarting(self, workers: _Workers) -> dict[str, Any]:
        """The ``restart=`` case: name the workers to match, and the liveness settings of its runs.

        The liveness is short so that the restarted worker, not a deadline,
        is what finds the steps the dead one ran: with the same node name at
        its start, with a new one after ``RESTART_LOST_AFTER`` seconds.
        """
        if self.restart == "same-name":
            workers.node = f"saga-crash-{self.prefix.removeprefix('sagacrash-')}@%h"
            how = (
                f"under the same node name ({workers.node.replace('%h', socket.gethostname())}), whose new "
                "instance declares the dead one lost at once"
            )
        else:
            how = (
                "under a new node name, whose sweeper declares the dead instance lost once it is silent "
                f"for {RESTART_LOST_AFTER:g}s"
            )
        self.notes.append(
            f"each killed worker was the only one, and was started again at once {how}; the workers write their "
            f"liveness every {RESTART_HEARTBEAT:g}s (saga_worker_heartbeat) and count as lost after "
            f"{RESTART_LOST_AFTER:g}s (saga_worker_lost_after)"
        )
        return {"saga_worker_heartbeat": RESTART_HEARTBEAT, "saga_worker_lost_after": RESTART_LOST_AFTER}

    def _acks_late(self) -> bool:
        names = [n for spec in self.saga.plan().steps for n in (spec.task, spec.compensation) if n]
        tasks = [self.app.tasks.get(n) for n in names]
        return bool(self.app.conf.task_acks_late) or any(getattr(t, "acks_late", False) for t in tasks)

    def _worker_settings(self, visibility: float | None) -> dict[str, Any]:
        """The app's changed settings (the test's included), for the workers to apply over their own."""
        settings, dropped = {}, []
        for key, value in self.app.conf.changes.items():
            if key == "deprecated_settings":  # Celery's own bookkeeping, not a setting
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                dropped.append(key)
            else:
                settings[key] = value
        if dropped and visibility is None:
            self.notes.append(f"settings not passed to the workers (not JSON): {', '.join(sorted(dropped))}")
        # Logs go to the worker's log file, not nowhere.
        settings["worker_hijack_root_logger"] = True
        if visibility is not None:
            settings["broker_transport_options"] = {
                **(settings.get("broker_transport_options") or {}),
                **{"visibility_timeout": visibility, "unacked_restore_interval": 1, "unacked_restore_throttle": 1},
            }
        return settings

    def _worker_args(self) -> list[str]:
        return [
            *("--pool", "prefork", "--concurrency", str(self.concurrency), "--loglevel", "WARNING"),
            *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            *("--queues", ",".join(app_queues(self.app))),
        ]

    # -- points ---------------------------------------------------------------------------

    def _select(self, listed: list[_Point], specs: list[PointSpec] | None, state: SagaState) -> list[_Point]:
        if specs is None:
            return listed
        every = _points_of(state, tuple(CrashPoint))
        chosen: list[_Point] = []
        for spec in specs:
            chosen += [p for p in (every if _names_number(spec) else listed) if _matches(p, spec) and p not in chosen]
        return [p for p in every if p in chosen]

    def _key(self, run: int) -> str:
        return f"{self.prefix}-{run}"

    def _report(
        self, baseline: ExploredPoint, explored: list[ExploredPoint], skipped: list[SkippedPoint], began: float
    ) -> CrashReport:
        return CrashReport(
            self.saga.name,
            self.depth,
            baseline,
            tuple(explored),
            tuple(skipped),
            tuple(self.notes),
            time.monotonic() - began,
            str(self.log_dir),
            self.restart,
        )


def _points_of(state: SagaState, numbers: tuple[CrashPoint, ...]) -> list[_Point]:
    """The points of every step that ran, in stage order, then of every compensation that ran, in undo order."""
    ran = [s for s in state.steps if s.started_at is not None]
    undone = sorted(
        (s for s in state.steps if s.compensation_started_at is not None),
        key=lambda s: (s.compensation_started_at, -s.stage),
    )
    steps = [_Point(s.name, False, n) for s in sorted(ran, key=lambda s: s.stage) for n in numbers]
    return steps + [_Point(s.name, True, n) for s in undone for n in numbers]


def _specs(points: Iterable[PointSpec] | Mapping[str, Iterable[int]]) -> list[PointSpec]:
    if isinstance(points, Mapping):
        return [(str(step), int(n)) for step, numbers in points.items() for n in numbers]
    if isinstance(points, (str, int)):
        return [points]
    return list(points)


def _names_number(spec: PointSpec) -> bool:
    return isinstance(spec, (int, tuple))


def _step_of(spec: PointSpec) -> str | None:
    if isinstance(spec, str):
        return spec
    if isinstance(spec, tuple):
        return spec[0]
    return None


def _matches(p: _Point, spec: PointSpec) -> bool:
    if isinstance(spec, str):
        return p.step == spec
    if isinstance(spec, int):
        return int(p.number) == spec
    if len(spec) == 2:
        return (p.step, int(p.number)) == spec
    return (p.step, int(p.number), p.kind) == spec


def _took(s: StepRecord) -> float:
    spans = [(s.started_at, s.ended_at), (s.compensation_started_at, s.compensation_ended_at)]
    return max(((b - a).total_seconds() for a, b in spans if a and b), default=0.0)


def _timeline(state: SagaState) -> str:
    return render_timeline(state, width=60)
