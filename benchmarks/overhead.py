"""Saga overhead: sagas against plain chains of the same tasks, side by side in one run.

Three workloads (``benchmarks/bench_app.py``), each as a saga and as the
plain chain of the same tasks with the same kwargs (``.si(**kwargs)``, a
Redis result backend as Celery users configure it):

- ``noop``: 3 steps that take nothing, return None, compensate nothing;
- ``real``: start kwargs of about 200 bytes, 3 steps that take them and
  return dicts of about 100 bytes, each with a compensation;
- ``data``: 3 steps that take ``**data`` and return small dicts, with compensations.

They run interleaved, round after round (in each round, each workload's chain
and saga in halves, A B B A, so drift in the machine's load hits both alike),
against one Redis (broker, result backend and saga store) and one
``celery worker -P prefork -c 2`` subprocess,
with every saga deadline on (the default 300 s step timeout). Printed: the
saga/chain throughput ratio per workload (targets: >= 1.1 real, >= 1.0 data),
the Redis memory each finished saga holds (growth of ``used_memory`` over a
batch; targets: <= 2 KB real, <= 1 KB noop, <= 6 KB for 20 steps), the
latency p50/p95 of one ``delay().get()`` against the chain's, CPU per saga,
and the Redis round trips per step. This is a script, not a timed test: it
exits 0 whatever the numbers.

Redis: ``REDIS_URL`` if set; else 127.0.0.1:6379 database 9 if it answers;
else a private server. Every run uses its own queue and key prefix and only
deletes its own keys.

``--rtt-ms X`` puts a delay proxy (``benchmarks/delay_proxy.py``) in front
of every Redis connection of the run (broker, result backend, saga store;
the worker's and this script's), adding X/2 ms each way, as a Redis on
another host would; it prints what the proxy really adds, measured by PING
through it and around it. ``--broker amqp://...`` runs the same comparison
over RabbitMQ, the result backend and the store staying on Redis.

``--store cluster`` puts the saga store on a 3-master Redis Cluster the
script starts (the broker stays the plain Redis: kombu has no cluster
transport); ``--wait-replicas 1`` puts it on a primary with a replica, and
every transition WAITs for the replica.

``--lock`` adds a fourth workload, ``locked``: the real one with
``lock="order:{n}"`` on every saga, a lock of its own each (no contention),
and prints its ratio against the real one's, measured side by side.

Usage: ``python benchmarks/overhead.py [--n 300] [--rounds 5] [--rtt-ms 1] [--broker amqp://...]
[--store cluster] [--wait-replicas 1] [--lock]``
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import redis
from celery import chain
from celery.exceptions import TimeoutError as CeleryTimeoutError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from celery_saga.redis_server import RedisServer, redis_answers  # noqa: E402
from celery_saga.store.redis import RedisSagaStore, mask_url  # noqa: E402 - needs ROOT on sys.path
from celery_saga.stores import store_for  # noqa: E402
from tests.deployments import Cluster, replica_online  # noqa: E402 - the test suite's own deployments

STEPS = 3
WORKLOADS = ("noop", "real", "data")
#: Throughput targets, saga/chain ("locked": --lock, the real workload with a lock per saga).
TARGETS = {"noop": 1.0, "real": 1.1, "data": 1.0, "locked": 1.1}
#: Bytes of Redis memory per finished saga, at most.
MEMORY_TARGETS = {"noop": 1024, "real": 2048, "wide": 6144}
#: Each workload as a plain chain and as a saga: "chain:real", "saga:real" ...
KINDS = tuple(f"{how}:{w}" for w in WORKLOADS for how in ("chain", "saga"))


# -- Redis --------------------------------------------------------------------------


@contextlib.contextmanager
def chosen_redis() -> Iterator[str]:
    """REDIS_URL; else the local server's database 9; else a private server, stopped on exit."""
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
    elif redis_answers("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/9"
    else:
        with RedisServer() as server:
            yield server.url


def command_calls(client: redis.Redis) -> Counter[str] | None:
    """Calls per command so far, from INFO commandstats; None if INFO is not allowed.

    Commands run inside Lua scripts are counted too: Redis counts every call.
    """
    try:
        info = client.info("commandstats")
    except redis.ResponseError:
        return None
    return Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()})


def redis_cpu(client: redis.Redis) -> float | None:
    """CPU seconds the Redis server has used, or None if INFO is not allowed."""
    try:
        info = client.info("cpu")
    except redis.ResponseError:
        return None
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def worker_cpu(pid: int) -> tuple[float, float] | None:
    """CPU seconds of a worker's main process and of its pool children (Linux /proc), or None elsewhere.

    The worker runs in its own session, so its pool is the rest of its process group.
    """
    if not os.path.isdir("/proc"):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    main = pool = 0
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command: state, ppid, pgrp, ..., utime (14th field), stime (15th).
        if int(fields[2]) == pid:
            used = int(fields[11]) + int(fields[12])
            if int(entry) == pid:
                main += used
            else:
                pool += used
    return main / tick, pool / tick


def delete_run_keys(client: redis.Redis, patterns: list[str]) -> int:
    """Delete the keys of this run only: everything else in this Redis may be someone else's."""
    deleted = 0
    for pattern in patterns:
        batch: list[str] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 500:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
    return deleted


# -- the worker ----------------------------------------------------------------------


class Worker:
    """A ``celery worker`` subprocess in its own session, stopped by its PID."""

    def __init__(self, env: dict[str, str], queue: str, log_path: str, command: list[str] | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the worker
        args = command or [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker"]
        args = [*args, "-P", "prefork", "-c", "2", "-Q", queue, "--without-gossip", "--without-mingle"]
        args += ["--without-heartbeat", "-l", "WARNING"]
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (warm shutdown), then SIGKILL to its process group, which holds only its pool."""
        pid = self.proc.pid
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"worker {pid} did not stop within {timeout:.0f}s; killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait(10)
        # Pool children left behind by a killed parent are in the worker's own session.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        self._log.close()


def wait_ready(bench: ModuleType, worker: Worker, ns: str, timeout: float = 60.0) -> None:
    """Wait until the worker runs a plain task; fail early if it died."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        if not worker.alive():
            raise RuntimeError(f"worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        attempt += 1
        try:
            bench.step1.apply_async(task_id=f"{ns}-ready-{attempt}").get(timeout=2)
            return
        except CeleryTimeoutError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready within {timeout:.0f}s:\n{worker.log_tail()}") from None


# -- batches --------------------------------------------------------------------------

#: Seconds a result may be awaited before it is checked for a stall.
STALL_AFTER = 5.0


class Stalled(Exception):
    """A chain's last result was stored in the result backend, but its ``get()`` was never woken.

    Seen once in a dozen runs here: ``AsyncResult.get()`` waited out its
    timeout for a result the backend held (Celery's Redis backend learns of
    results by pub/sub, and subscribes on another connection than it reads
    on). The stalled batch is run again rather than timed with the stall.
    """


@dataclass
class Batch:
    kind: str
    n: int
    seconds: float
    round: int
    commands: Counter[str] | None
    #: CPU seconds used during the batch by this process, the worker (all its processes) and Redis.
    cpu: dict[str, float | None]

    @property
    def rate(self) -> float:
        return self.n / self.seconds


class Runner:
    def __init__(self, bench: ModuleType, client: redis.Redis, ns: str, worker_pid: int) -> None:
        self.bench = bench
        self.worker_pid = worker_pid
        self.client = client
        self.ns = ns
        self.seq = 0

    def memory_per_saga(self, workload: str, n: int) -> float:
        """Growth of the store's ``used_memory`` per finished saga, over ``n`` sagas.

        Chains' result keys are deleted first, so that only the sagas' records
        and index entries are counted.
        """
        delete_run_keys(self.client, [f"celery-task-meta-{self.ns}-*"])
        before = self.store_memory()
        self.batch(f"saga:{workload}", n)
        after = self.store_memory()
        return (after - before) / n

    def store_memory(self) -> int:
        """``used_memory`` of the saga store: the broker's Redis, or each primary of a separate store."""
        store = store_for(self.bench.app)
        servers = store.servers() if isinstance(store, RedisSagaStore) else [self.client]
        return sum(int(server.info("memory")["used_memory"]) for server in servers)

    def latency(self, kinds: tuple[str, ...], n: int) -> dict[str, tuple[float, float]]:
        """p50 and p95 (ms) of one ``delay().get()`` of each kind, ``n`` times, the kinds taking turns.

        Taking turns, rather than one kind's ``n`` and then the other's, puts
        both under the same drift in the machine's load.
        """
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for i in range(n):
            for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                for _ in range(3):
                    start = time.perf_counter()
                    try:
                        self.wait(kind, self.publish(kind, 1), 30.0)
                    except Stalled:
                        continue  # a stall of Celery's result backend is no latency of the chain's: again
                    times[kind].append((time.perf_counter() - start) * 1000)
                    break
        result = {}
        for kind, got in times.items():
            got.sort()
            result[kind] = statistics.median(got), got[min(len(got) - 1, round(0.95 * (len(got) - 1)))]
        return result

    def tasks(self, workload: str) -> tuple[list[Any], dict[str, Any]]:
        """The tasks of a workload's chain, and the kwargs each takes."""
        b = self.bench
        if workload == "noop":
            return [b.step1, b.step2, b.step3], {}
        if workload in ("real", "locked"):
            return [b.reserve, b.charge, b.ship], b.ORDER
        return [b.d1, b.d2, b.d3], b.ORDER

    def saga(self, workload: str) -> Any:
        b = self.bench
        sagas = {"noop": b.bench_saga, "real": b.bench_real, "data": b.bench_data, "wide": b.bench_wide}
        return {**sagas, "locked": b.bench_locked}[workload]

    def publish_chain(self, workload: str) -> Any:
        tasks, kwargs = self.tasks(workload)
        if workload == "data":
            # The chain passes each result on as the saga would: the tasks take **data.
            kwargs = {**kwargs, "reservation_id": "r", "payment_id": "p"}
        self.seq += 1
        # Ids carrying the run id make the result keys easy to find and delete.
        tid = f"{self.ns}-c{self.seq}"
        return chain(*(t.si(**kwargs).set(task_id=f"{tid}-{i}") for i, t in enumerate(tasks))).apply_async()

    def publish(self, kind: str, n: int) -> list[Any]:
        how, workload = kind.split(":")
        if how == "chain":
            return [self.publish_chain(workload) for _ in range(n)]
        saga = self.saga(workload)
        _, kwargs = self.tasks(workload) if workload != "wide" else (None, {})
        if workload == "locked":
            # A lock of its own per saga: uncontended (the steps take no "n"; a saga passes a step only its own kwargs).
            first = self.seq
            self.seq += n
            return [saga.delay(**kwargs, n=f"{self.ns}-{first + i}") for i in range(n)]
        return [saga.delay(**kwargs) for _ in range(n)]

    def wait(self, kind: str, results: list[Any], timeout: float) -> None:
        """Wait for every result, newest first: FIFO queues finish it last, so the others are done by then.

        Raises:
            Stalled: a chain's result was stored but its waiter was never told
                (see `Stalled`); the batch's time means nothing.
        """
        deadline = time.monotonic() + timeout
        for res in reversed(results):
            while True:
                left = max(0.1, deadline - time.monotonic())
                try:
                    res.get(timeout=min(left, STALL_AFTER))
                    break
                except CeleryTimeoutError:
                    if kind.startswith("chain:") and res.backend.get_task_meta(res.id)["status"] == "SUCCESS":
                        raise Stalled(kind) from None
                    if left <= STALL_AFTER:
                        raise

    def batch(self, kind: str, n: int, timeout: float = 300.0, round: int = 0) -> Batch:
        """Run ``n`` of ``kind`` and time them; a batch that stalled in Celery's result backend is run again."""
        for _ in range(3):
            try:
                return self._batch(kind, n, timeout, round)
            except Stalled:
                print(f"  ({kind}: a chain's result was stored, but Celery's waiter was not told; batch run again)")
        raise RuntimeError(f"{kind}: Celery's result backend stalled three batches in a row")

    def _batch(self, kind: str, n: int, timeout: float, round: int) -> Batch:
        before = command_calls(self.client)
        cpu0 = self.cpu()
        start = time.perf_counter()
        results = self.publish(kind, n)
        self.wait(kind, results, timeout)
        seconds = time.perf_counter() - start
        cpu1 = self.cpu()
        after = command_calls(self.client)
        cpu = {k: _minus(cpu1[k], cpu0[k]) for k in cpu0}
        delta = None
        if before is not None and after is not None:
            delta = after - before
            delta["info"] -= 1  # the INFO that took `before`
            delta = +delta
        return Batch(kind, n, seconds, round, delta, cpu)

    def cpu(self) -> dict[str, float | None]:
        worker = worker_cpu(self.worker_pid)
        return {
            "publisher": time.process_time(),
            "worker main": None if worker is None else worker[0],
            "pool": None if worker is None else worker[1],
            "redis": redis_cpu(self.client),
        }


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


# -- round trips, from a MONITOR sample --------------------------------------------------


@dataclass
class Sample:
    """Commands of this run seen by MONITOR, split into client round trips and Lua-internal calls."""

    round_trips: Counter[str] = field(default_factory=Counter)
    in_lua: Counter[str] = field(default_factory=Counter)


def monitor_sample(runner: Runner, url: str, db: int, kind: str, n: int) -> Sample | None:
    """Run one untimed batch under MONITOR and attribute what Redis saw to this run.

    INFO commandstats counts the commands that scripts run and cannot tell
    this run from other users of a shared Redis; MONITOR shows both. A
    MULTI..EXEC block (a redis-py transaction pipeline) is one round trip.
    """
    lines: list[dict[str, Any]] = []
    stop = threading.Event()
    failed: list[BaseException] = []
    conn = redis.Redis.from_url(url, decode_responses=True)

    def listen() -> None:
        try:
            with conn.monitor() as m:
                started.set()
                while not stop.is_set():
                    lines.append(m.next_command())
        except Exception as exc:
            failed.append(exc)
            started.set()

    started = threading.Event()
    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    started.wait(5)
    if failed:
        print(f"(MONITOR not available: {failed[0]}; no round-trip sample)")
        return None
    runner.batch(kind, n)
    stop.set()
    runner.client.ping()  # wakes the listener
    thread.join(10)
    conn.close()

    ns = runner.ns
    ours = {
        (x["client_address"], x["client_port"])
        for x in lines
        if x["client_type"] != "lua" and x["db"] == db and ns in x["command"]
    }
    sample = Sample()
    owner_is_ours = False
    in_multi: set[tuple[str, str]] = set()
    for x in lines:
        name = x["command"].split(" ", 1)[0].lower()
        if x["client_type"] == "lua":
            # A script's calls directly follow the EVALSHA that ran it.
            if owner_is_ours:
                sample.in_lua[name] += 1
            continue
        who = (x["client_address"], x["client_port"])
        owner_is_ours = who in ours
        if not owner_is_ours:
            continue
        if name == "multi":
            in_multi.add(who)
            sample.round_trips["multi..exec"] += 1
        elif who in in_multi:
            if name == "exec":
                in_multi.discard(who)
        else:
            sample.round_trips[name] += 1
    return sample


# -- reporting ------------------------------------------------------------------------


def per_step(counter: Counter[str], steps: int) -> str:
    top = ", ".join(f"{name} {calls / steps:.2f}" for name, calls in counter.most_common(8))
    return f"{sum(counter.values()) / steps:5.2f}/step  ({top})"


def report_cpu(batches: list[Batch]) -> None:
    print("\nCPU ms per saga / chain over the timed batches (2 cores shared by all; Redis is indicative)")
    for kind in KINDS:
        mine = [b for b in batches if b.kind == kind]
        n = sum(b.n for b in mine)
        parts = []
        for who in ("publisher", "worker main", "pool", "redis"):
            used = [b.cpu[who] for b in mine]
            if all(u is not None for u in used):
                parts.append(f"{who} {1000 * sum(u for u in used if u is not None) / n:5.2f}")
        wall = 1000 * sum(b.seconds for b in mine) / n
        print(f"  {kind:9}: wall {wall:5.2f}   " + "   ".join(parts))


def report_commands(batches: list[Batch]) -> None:
    print("\nRedis commands per step, INFO commandstats over the timed batches (incl. calls inside Lua;")
    print("indicative only: a shared Redis also counts other clients)")
    for kind in KINDS:
        mine = [b for b in batches if b.kind == kind]
        if any(b.commands is None for b in mine):
            print("  (INFO commandstats not permitted; skipped)")
            return
        total: Counter[str] = Counter()
        for b in mine:
            total.update(b.commands or {})
        print(f"  {kind:9}: {per_step(total, STEPS * sum(b.n for b in mine))}")


def report_sample(samples: dict[str, Sample], n: int) -> None:
    print(f"\nRedis round trips per step, MONITOR sample of {n} of each (publisher + worker + waiting;")
    print("a MULTI..EXEC pipeline counts once)")
    for kind, s in samples.items():
        print(f"  {kind:9}: round trips {per_step(s.round_trips, STEPS * n)}")
        if s.in_lua:
            print(f"             inside Lua  {per_step(s.in_lua, STEPS * n)}")


# -- main -----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=300, help="sagas and chains of each kind per round (default 300)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each kind (default 5)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed sagas and chains first (default 30)")
    parser.add_argument(
        "--memory-n", type=int, default=300, help="sagas per memory measurement, 0 to skip (default 300)"
    )
    parser.add_argument(
        "--latency-n", type=int, default=100, help="delay().get() calls to time, 0 to skip (default 100)"
    )
    parser.add_argument(
        "--monitor-n", type=int, default=50, help="sagas and chains in the MONITOR sample, 0 to skip (default 50)"
    )
    parser.add_argument(
        "--store",
        choices=("redis", "cluster"),
        default="redis",
        help="the saga store: the broker's Redis (default), or a 3-master Redis Cluster the script starts",
    )
    parser.add_argument(
        "--wait-replicas",
        type=int,
        default=0,
        help="saga_redis_wait_replicas: with 1, the store is a primary with a replica the script starts",
    )
    parser.add_argument(
        "--rtt-ms",
        type=float,
        default=0.0,
        help="round-trip time a delay proxy adds to every Redis connection (default 0: none)",
    )
    parser.add_argument(
        "--lock",
        action="store_true",
        help="also run the real workload with lock= on every saga (one lock each, no contention), side by side",
    )
    parser.add_argument(
        "--broker",
        default=None,
        help="the broker, if not the Redis (amqp://guest:guest@127.0.0.1:5672// for RabbitMQ)",
    )
    args = parser.parse_args(argv)
    if args.lock:
        global WORKLOADS, KINDS
        WORKLOADS = (*WORKLOADS, "locked")
        KINDS = tuple(f"{how}:{w}" for w in WORKLOADS for how in ("chain", "saga"))
    if (args.rtt_ms or args.broker) and (args.store != "redis" or args.wait_replicas):
        parser.error("--rtt-ms and --broker take the default store only")
    with saga_store(args.store, args.wait_replicas) as store_url:
        if store_url:
            # The store is not the broker's Redis: MONITOR and INFO of the broker would not see it.
            print(f"saga store: {mask_url(store_url)}, saga_redis_wait_replicas={args.wait_replicas}")
            os.environ.update(BENCH_STORE_URL=store_url, BENCH_WAIT_REPLICAS=str(args.wait_replicas))
            args.monitor_n = 0
        return run(args)


@contextlib.contextmanager
def saga_store(kind: str, wait_replicas: int) -> Iterator[str]:
    """The saga store's URL when it is not the broker's Redis ("" when it is), started for the run."""
    if kind == "cluster":
        if wait_replicas:
            raise SystemExit("--wait-replicas is not supported with --store cluster")
        with Cluster() as cluster:
            yield cluster.url
    elif wait_replicas:
        with contextlib.ExitStack() as stack:
            primary = stack.enter_context(RedisServer(persist=True))
            for _ in range(wait_replicas):
                stack.enter_context(RedisServer(args=["--replicaof", "127.0.0.1", str(primary.port)]))
            with redis.Redis(port=primary.port, decode_responses=True) as client:
                while not replica_online(client):
                    time.sleep(0.05)
            yield primary.url
    else:
        yield ""


@dataclass
class BenchRun:
    """One run of a benchmark script: its Redis, queue and key prefix, the bench app, a worker's env and log."""

    url: str
    ns: str
    queue: str
    prefix: str
    bench: ModuleType
    client: redis.Redis
    env: dict[str, str]
    log_path: str


@contextlib.contextmanager
def delayed(url: str, rtt_ms: float) -> Iterator[str]:
    """``url`` through a delay proxy adding ``rtt_ms`` per round trip (``url`` itself for 0), stopped on exit.

    The proxy's own cost per round trip (a Python process relaying on a busy
    machine, about 0.3-0.5 ms here) is measured first, through a proxy that
    holds nothing, and taken off the delay it is given: what it adds in all
    comes close to ``rtt_ms``, and is printed.
    """
    if not rtt_ms:
        yield url
        return
    with _proxy(url, 0.0) as bare:
        own = added_ms(url, bare)
    with _proxy(url, max(0.0, rtt_ms - own) / 2) as proxied:
        print(
            f"delay proxy: {rtt_ms:g} ms asked; PING through it adds {added_ms(url, proxied):.2f} ms "
            f"(median of 300; the proxy's own {own:.2f} ms included)"
        )
        yield proxied


@contextlib.contextmanager
def _proxy(url: str, delay_ms: float) -> Iterator[str]:
    parts = redis.connection.parse_url(url)
    target = f"{parts.get('host', '127.0.0.1')}:{parts.get('port', 6379)}"
    proxy = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "delay_proxy.py"), "--target", target, "--delay-ms", f"{delay_ms}"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        line = proxy.stdout.readline() if proxy.stdout else ""
        if not line.startswith("listening on "):
            raise RuntimeError(f"the delay proxy did not start: {line!r}")
        yield url.replace(target, f"127.0.0.1:{int(line.split()[-1])}", 1)
    finally:
        proxy.terminate()
        proxy.wait(10)


def added_ms(direct: str, proxied: str, n: int = 300) -> float:
    """What the proxy really adds to a round trip: median PING through it, minus median PING around it."""

    def median_ping(url: str) -> float:
        with redis.Redis.from_url(url) as client:
            client.ping()
            times = []
            for _ in range(n):
                start = time.perf_counter()
                client.ping()
                times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000

    return median_ping(proxied) - median_ping(direct)


@contextlib.contextmanager
def bench_run(log_name: str, rtt_ms: float = 0.0, broker: str | None = None) -> Iterator[BenchRun]:
    """Point ``benchmarks.bench_app`` at a Redis under a fresh queue and prefix; delete this run's keys after.

    ``rtt_ms``: every Redis connection of the run goes through a delay proxy;
    ``broker``: the broker, if not that Redis (the backend and store stay on it).
    """
    ns = uuid.uuid4().hex[:10]
    queue, prefix = f"bench-q-{ns}", f"bench-{ns}"
    with chosen_redis() as url, delayed(url, rtt_ms) as reached:
        print(f"Redis {mask_url(url)}, queue {queue}, key prefix {prefix}")
        if broker:
            print(f"broker {mask_url(broker)}")
        os.environ.update(
            BENCH_BROKER_URL=broker or reached, BENCH_BACKEND_URL=reached, BENCH_QUEUE=queue, BENCH_PREFIX=prefix
        )
        bench = importlib.import_module("benchmarks.bench_app")
        client = redis.Redis.from_url(url, decode_responses=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log_path = os.path.join(tempfile.gettempdir(), f"{log_name}-{ns}.log")
        try:
            yield BenchRun(url, ns, queue, prefix, bench, client, env, log_path)
        finally:
            deleted = delete_run_keys(
                client,
                [
                    f"{prefix}:*",
                    f"{queue}*",
                    f"_kombu.binding.{queue}",
                    f"_kombu.binding_permanent.{queue}",
                    f"celery-task-meta-{ns}-*",
                ],
            )
            client.close()
            if broker:
                with bench.app.connection_for_write() as conn:
                    conn.default_channel.queue_delete(queue)
            bench.app.close()
            print(f"\ncleaned up: {deleted} keys of this run deleted")


def run(args: argparse.Namespace) -> int:
    with bench_run("bench-worker", args.rtt_ms, args.broker) as b:
        url, ns, bench, client, log_path = b.url, b.ns, b.bench, b.client, b.log_path
        worker = Worker(b.env, b.queue, log_path)
        ok = False
        try:
            wait_ready(bench, worker, ns)
            runner = Runner(bench, client, ns, worker.proc.pid)
            if args.warmup:
                for kind in KINDS:
                    runner.batch(kind, args.warmup)
            batches = run_rounds(runner, args.n, args.rounds)
            latencies = runner.latency(("chain:real", "saga:real"), args.latency_n) if args.latency_n > 0 else {}
            memory: dict[str, float] = {}
            if args.memory_n > 0:
                for workload in ("noop", "real", "wide"):
                    n = args.memory_n if workload != "wide" else max(1, args.memory_n // 3)
                    memory[workload] = runner.memory_per_saga(workload, n)
            report_cpu(batches)
            report_commands(batches)
            if args.monitor_n > 0:
                samples: dict[str, Sample] = {}
                for kind in KINDS:
                    s = monitor_sample(runner, url, _db(url), kind, args.monitor_n)
                    if s is None:
                        break
                    samples[kind] = s
                if samples:
                    report_sample(samples, args.monitor_n)
            report_ratio(batches, latencies, memory)
            ok = True
        finally:
            worker.stop()
            if ok:
                os.unlink(log_path)
            else:
                print(f"worker log: {log_path}", file=sys.stderr)
            print(f"\nworker {worker.proc.pid} stopped")
    return 0


def _db(url: str) -> int:
    return int(redis.connection.parse_url(url).get("db", 0))


def run_rounds(runner: Runner, n: int, rounds: int) -> list[Batch]:
    """``rounds`` rounds; in each, every workload as chain and saga in halves, A B B A.

    The halves of a workload run chain, saga, saga, chain (saga first in odd
    rounds), so a drift in the machine's load during the round hits both
    kinds alike instead of whichever ran while it lasted.
    """
    batches: list[Batch] = []
    half = max(1, n // 2)
    print(f"\n{rounds} rounds of {2 * half} of each, {STEPS} steps each, prefork -c 2 (saga/chain ratio per workload)")
    for r in range(rounds):
        rates: dict[str, str] = {}
        for w in WORKLOADS[r % len(WORKLOADS) :] + WORKLOADS[: r % len(WORKLOADS)]:
            a, b = (f"chain:{w}", f"saga:{w}") if r % 2 == 0 else (f"saga:{w}", f"chain:{w}")
            got = [runner.batch(kind, half, round=r) for kind in (a, b, b, a)]
            batches += got
            saga, chain = (_rate([x for x in got if x.kind == f"{k}:{w}"]) for k in ("saga", "chain"))
            rates[w] = f"{w} {saga:6.1f}/{chain:6.1f}/s ({saga / chain:.3f})"
        print(f"  round {r + 1}: " + "   ".join(rates[w] for w in WORKLOADS))
    return batches


def _rate(batches: list[Batch]) -> float:
    return sum(b.n for b in batches) / sum(b.seconds for b in batches)


def report_ratio(batches: list[Batch], latencies: dict[str, tuple[float, float]], memory: dict[str, float]) -> None:
    def total(kind: str) -> float:
        return _rate([b for b in batches if b.kind == kind])

    def round_ratios(workload: str) -> list[float]:
        rounds = sorted({b.round for b in batches})
        return [
            _rate([b for b in batches if b.round == r and b.kind == f"saga:{workload}"])
            / _rate([b for b in batches if b.round == r and b.kind == f"chain:{workload}"])
            for r in rounds
        ]

    print("\nsaga/chain throughput, deadlines on (median of the rounds' ratios; target)")
    for w in WORKLOADS:
        median = statistics.median(round_ratios(w))
        verdict = "met" if median >= TARGETS[w] else "NOT met"
        print(
            f"  {w:5}: saga {total('saga:' + w):6.1f}/s   chain {total('chain:' + w):6.1f}/s   "
            f"ratio {median:.2f}  (>= {TARGETS[w]}: {verdict})"
        )
    if "locked" in WORKLOADS:
        real, locked = statistics.median(round_ratios("real")), statistics.median(round_ratios("locked"))
        change = locked / real - 1
        print(
            f"  a lock on every saga: ratio {locked:.3f} against {real:.3f} without, {change:+.1%} "
            f"(within 5%: {'met' if change >= -0.05 else 'NOT met'})"
        )
    if latencies:
        (c50, c95), (s50, s95) = latencies["chain:real"], latencies["saga:real"]
        print(
            f"\nlatency of one delay().get(), real workload: saga p50 {s50:.1f} ms p95 {s95:.1f} ms   "
            f"chain p50 {c50:.1f} ms p95 {c95:.1f} ms   (saga p50 <= chain p50: {'met' if s50 <= c50 else 'NOT met'})"
        )
    if memory:
        print("\nRedis memory per finished saga (growth of used_memory; target)")
        for w, size in memory.items():
            label = {"noop": "noop (no data)", "real": "real (3 steps)", "wide": "20 steps, 70 B each"}[w]
            verdict = "met" if size <= MEMORY_TARGETS[w] else "NOT met"
            print(f"  {label:20}: {size:7.0f} B  (<= {MEMORY_TARGETS[w]} B: {verdict})")


if __name__ == "__main__":
    sys.exit(main())
