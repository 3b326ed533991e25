"""A ``celery worker`` that dies at one crash point: the workers of the crash-point explorer (`explore`).

``python -m celery_saga.testing.crash_worker SPEC [worker options]`` imports the
app named in SPEC (a JSON object: ``app``, the ``-A`` path; ``settings``,
applied over the app's own; ``crash``, where to die, or null), then runs
``celery worker`` with the options, exactly as ``celery -A <app> worker`` would.

Where to die is one saga's step (or compensation) and one `CrashPoint`. When
a message of that saga reaches it, the worker pushes its PID to the ``gate``
list in Redis, so the explorer knows the point was reached, and SIGKILLs its
own process group: the main process and every pool child at once, as a power
cut or the OOM killer would. It must therefore lead its own process group
(the explorer starts it with ``start_new_session``); it refuses to start
otherwise, so it can never kill the group of whoever started it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

import redis
from celery.app.utils import find_app

from ..worker import wrapper
from ..worker.wrapper import CrashPoint

__all__ = ["CrashAt", "main"]


@dataclass(frozen=True)
class CrashAt:
    """Where a worker dies: one saga's step or compensation, at one point."""

    saga_id: str
    step: str
    compensating: bool
    point: CrashPoint
    #: Redis URL and list key the worker pushes its PID to before it dies.
    gate_url: str
    gate_key: str

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "point": int(self.point)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> CrashAt:
        return cls(**{**raw, "point": CrashPoint(raw["point"])})


class _Die:
    """The crash hook: die at ``at``, and nowhere else."""

    def __init__(self, at: CrashAt, group: int) -> None:
        self.at, self.group = at, group

    def __call__(self, saga_id: str, step: str, compensating: bool, point: CrashPoint) -> None:
        at = self.at
        if (saga_id, step, compensating, point) != (at.saga_id, at.step, at.compensating, at.point):
            return
        with redis.Redis.from_url(at.gate_url) as client:
            client.rpush(at.gate_key, os.getpid())
        os.killpg(self.group, signal.SIGKILL)


def main(argv: list[str]) -> int:
    """Run the worker SPEC describes, with the worker options that follow it."""
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    group = os.getpgrp()
    if group != os.getpid():
        print("crash_worker: must lead its own process group (start it with start_new_session=True)", file=sys.stderr)
        return 2
    app = find_app(spec["app"])
    app.conf.update(spec.get("settings") or {})
    if spec.get("crash"):
        # Set before the pool forks: every child inherits it.
        wrapper.set_crash_hook(_Die(CrashAt.from_json(spec["crash"]), group))
    app.worker_main(["worker", *argv[1:]])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
