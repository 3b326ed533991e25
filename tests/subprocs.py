"""Subprocesses of the process tests (``celery -A tests.proc_app ...``) and their shared fixtures' pieces.

Each subprocess runs in its own session, logging to its own file, and is
stopped by its PID and process group: never by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

from tests import proc_app
from tests.helpers import patience

ROOT = Path(__file__).resolve().parent.parent

Popen = subprocess.Popen[bytes]
S = TypeVar("S", bound="Subprocs")


class Subprocs:
    """The subprocesses of one test, each in its own session, logging to its own file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[tuple[str, Popen, Path]] = []

    def celery(
        self, label: str, args: list[str], env: dict[str, str], app: str = "tests.proc_app"
    ) -> tuple[Popen, Path]:
        """Start ``celery -A <app> <args>``, logging to ``<label>.log``."""
        log_path = self.tmp_path / f"{label}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", app, *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=ROOT,
            )
        self.procs.append((label, proc, log_path))
        return proc, log_path

    @staticmethod
    def kill_group(proc: Popen) -> None:
        # Each leads its own process group (start_new_session=True): this
        # reaches pool children a SIGKILLed main process left behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def wait_dead(self, proc: Popen, timeout: float = 15.0) -> int:
        """Wait for a process that was killed to exit, then make sure its children are gone too."""
        code = proc.wait(patience(timeout))
        self.kill_group(proc)
        return code

    def stop(self, proc: Popen, timeout: float = 15.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(patience(timeout))
            except subprocess.TimeoutExpired:
                self.kill_group(proc)
                proc.wait(patience(timeout))
        self.kill_group(proc)

    def stop_all(self) -> None:
        # Latest first: a worker stops before the Flower watching it.
        for _, proc, _ in reversed(self.procs):
            self.stop(proc)

    def logs(self) -> str:
        parts = []
        for label, proc, path in self.procs:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {label} pid {proc.pid} (exit {proc.returncode}) ---\n{text[-6000:]}")
        return "\n".join(parts)


def worker_args(queue: str, name: str, *extra: str) -> list[str]:
    """``celery worker`` arguments: a prefork pool of 2 on ``queue``, named ``name``, plus ``extra`` options."""
    pool = ["-P", "prefork", "-c", "2", "-Q", queue, "--without-gossip", "--without-mingle"]
    return ["worker", *extra, *pool, "-l", "INFO", "-n", name]


@contextlib.contextmanager
def running(procs: S) -> Iterator[S]:
    """Yield ``procs``; on the way out stop them all and write their logs to stderr."""
    try:
        yield procs
    finally:
        procs.stop_all()
        # Captured: pytest shows it only for a failed test.
        sys.stderr.write(procs.logs())


class Procs(Subprocs):
    """The ``celery worker`` and ``celery saga sweep`` subprocesses of one test, on its queue."""

    def __init__(self, tmp_path: Path, env: SimpleNamespace, ns: str) -> None:
        super().__init__(tmp_path)
        self.env = env
        self.ns = ns

    def worker(self, queues: str | None = None, visibility: float | None = None, sweeper: bool = True) -> Popen:
        """A prefork worker (-c 2) on ``queues`` (default: the test's queue), with its deadline sweeper unless told."""
        env = dict(self.env.proc_env)
        if visibility is not None:
            env[proc_app.ENV_VISIBILITY] = str(visibility)
        if not sweeper:
            env[proc_app.ENV_SWEEPER] = "0"
        n = len(self.procs)
        args = worker_args(queues or self.env.queue, f"w{n}-{self.ns}@%h", "--without-heartbeat")
        proc, _ = self.celery(f"worker-{n}", args, env)
        return proc

    def sweeper(self, interval: float = 0.05) -> tuple[Popen, Path]:
        """A standalone sweeper: ``celery -A tests.proc_app saga sweep``."""
        args = ["saga", "sweep", "--interval", str(interval)]
        return self.celery(f"sweeper-{len(self.procs)}", args, self.env.proc_env)

    def kill(self, proc: Popen) -> int:
        """SIGKILL a worker's main process and its whole process group (its pool children) at once."""
        self.kill_group(proc)
        return self.wait_dead(proc)

    def stop_all(self) -> None:
        # Killed, not stopped: a warm shutdown would wait for steps blocked on gates.
        for _, proc, _ in reversed(self.procs):
            self.kill_group(proc)
            proc.wait(patience(15))


def proc_env(redis_url: str, prefix: str, queue: str, saga_conf: dict[str, Any] | None = None) -> SimpleNamespace:
    """A test's Redis, key prefix and queue, and the environment of its subprocesses.

    ``saga_conf`` adds settings to the app on both sides: a saga store elsewhere, say.
    """
    env = proc_app.worker_env(redis_url, prefix, queue, saga_conf)
    return SimpleNamespace(redis_url=redis_url, prefix=prefix, queue=queue, proc_env=env, saga_conf=saga_conf or {})
