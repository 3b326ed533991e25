"""What every test module shares: waiting on conditions, the store clock, queues, gates and the ledger.

Nothing here sleeps for a fixed time: tests wait for a condition (polling
with a deadline), and hold a task mid-flight on a gate in Redis. Every
deadline a test waits against is scaled by one knob,
``SAGA_TEST_TIMEOUT_SCALE`` (default 1): `wait_for`, `finished` and the gates
scale their own, and a test passes any other wait through `patience`.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from celery_saga import SagaResult, SagaStatus

#: How much longer than on an idle machine every wait of the tests may take.
TIMEOUT_SCALE = float(os.environ.get("SAGA_TEST_TIMEOUT_SCALE") or 1)


def patience(seconds: float) -> float:
    """How long to wait for something that takes ``seconds`` at most on an idle machine."""
    return seconds * TIMEOUT_SCALE


def wait_for(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``patience(timeout)``."""
    timeout = patience(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def finished(res: SagaResult, timeout: float = 30.0) -> SagaStatus:
    """Wait until the saga has finished and return its final status."""

    def done() -> SagaStatus | None:
        status = res.status
        return status if status.finished else None

    final: SagaStatus = wait_for(done, timeout, f"saga {res.id} to finish")
    return final


def store_now(client: redis.Redis) -> float:
    """The saga store's clock (Redis TIME), in epoch seconds: deadlines are measured on it."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1e6


def saga_keys(client: redis.Redis, prefix: str) -> list[str]:
    """The keys of saga records and indexes under ``prefix``.

    Not the store's own ``{meta}``, made at first use, nor the workers' liveness (``{workers}``).
    """
    own = (f"{prefix}:{{meta}}", f"{prefix}:{{workers}}")
    return [k for k in client.scan_iter(match=f"{prefix}:{{*") if not k.startswith(own)]


def kombu_prefix(prefix: str) -> str:
    """The ``global_keyprefix`` the test apps give kombu: queues and the unacked hash live under it."""
    return f"{prefix}:kombu:"


def queue_key(prefix: str, queue: str) -> str:
    """The Redis list that holds ``queue``'s messages."""
    return f"{kombu_prefix(prefix)}{queue}"


def unacked(client: redis.Redis, prefix: str) -> int:
    """Messages delivered to a worker and not acknowledged yet."""
    return int(client.hlen(f"{kombu_prefix(prefix)}unacked"))


def drained(client: redis.Redis, prefix: str, queue: str) -> bool:
    """Nothing queued on ``queue`` and nothing delivered but unacknowledged."""
    return client.llen(queue_key(prefix, queue)) == 0 and unacked(client, prefix) == 0


class Gates:
    """Gates in Redis that hold a task mid-flight until the test opens them.

    A task calls ``enter(name)``: it records an entry in
    ``<prefix>:entered:<name>``, then blocks until the test calls
    ``open(name)``, which pushes to ``<prefix>:gate:<name>``. The client must
    have a socket timeout longer than the gate's (redis-py 8 defaults to 5 s).
    """

    def __init__(self, client: redis.Redis, prefix: str, timeout: float = 60.0) -> None:
        self.client = client
        self.prefix = prefix
        self.timeout = timeout

    def enter(self, name: str, entry: str = "1") -> None:
        """Task side: say it got here, and wait for the gate to open."""
        self.client.rpush(f"{self.prefix}:entered:{name}", entry)
        if self.client.blpop([f"{self.prefix}:gate:{name}"], timeout=patience(self.timeout)) is None:
            raise TimeoutError(f"gate {name} never opened")

    def open(self, name: str) -> None:
        """Let one task through gate ``name`` (now, or when it gets there)."""
        self.client.rpush(f"{self.prefix}:gate:{name}", "open")

    def entered(self, name: str) -> list[str]:
        """The entries of every task that reached gate ``name``, in order."""
        return [str(x) for x in self.client.lrange(f"{self.prefix}:entered:{name}", 0, -1)]

    def wait_entered(self, name: str, count: int = 1, timeout: float = 15.0) -> list[str]:
        """Wait until ``count`` tasks reached gate ``name``; their entries."""

        def arrived() -> list[str] | None:
            entries = self.entered(name)
            return entries if len(entries) >= count else None

        found: list[str] = wait_for(arrived, timeout, f"{count} task(s) at gate {name}")
        return found


class Ledger:
    """What took effect, in order, as written by the test tasks into Redis (JSON entries)."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client = client
        self.key = key

    def entries(self) -> list[list[Any]]:
        return [json.loads(x) for x in self.client.lrange(self.key, 0, -1)]

    def actions(self) -> list[str]:
        return [f"{e[0]}:{e[1]}" for e in self.entries()]

    def times(self, action: str) -> list[float]:
        return [e[-1] for e in self.entries() if f"{e[0]}:{e[1]}" == action]


@contextmanager
def monitored(redis_url: str) -> Iterator[list[tuple[str, str]]]:
    """Every command the server of ``redis_url`` runs while the block runs, by MONITOR: (client type, command).

    A script's own commands have the client type ``lua``. The listener reads
    up to an ECHO of a marker sent when the block ends, so every command
    before it is in the list, however busy the machine.
    """
    seen: list[tuple[str, str]] = []
    ready, marker = threading.Event(), f"end-of-monitor-{uuid.uuid4().hex}"
    conn = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=patience(30))

    def listen() -> None:
        with conn.monitor() as m:  # type: ignore[no-untyped-call]
            ready.set()
            while True:
                line = m.next_command()
                if marker in line["command"]:
                    return
                seen.append((line["client_type"], line["command"]))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    assert ready.wait(patience(5))
    try:
        yield seen
    finally:
        with redis.Redis.from_url(redis_url) as client:
            client.echo(marker)
        thread.join(patience(10))
        conn.close()
