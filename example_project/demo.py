"""`make demo`: run the order saga for real and show what happened.

Starts a private Redis (or uses ``REDIS_URL``), one worker per service as
subprocesses, places a few orders, prints live progress and each saga's
timeline, then stops everything it started: workers first, then Redis.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

SERVICES = ("inventory", "payments", "shipping")
ROOT = Path(__file__).resolve().parent.parent

ORDERS: list[tuple[str, dict[str, Any]]] = [
    ("happy order", {"order_id": 1, "items": ["book", "lamp"], "amount": 30, "card": "4242-4242-4242-4242",
                     "address": "1 Main St"}),
    ("card declined", {"order_id": 2, "items": ["chair"], "amount": 80, "card": "4000-0000-0000-0002",
                       "address": "2 High St"}),
    ("undeliverable", {"order_id": 3, "items": ["desk"], "amount": 120, "card": "4242-4242-4242-4242",
                       "address": "nowhere"}),
]  # fmt: skip


class Demo:
    def __init__(self) -> None:
        self.redis: Any = None
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logdir = tempfile.mkdtemp(prefix="celery-saga-demo-")
        self.results: list[tuple[str, Any]] = []
        self.given_redis = bool(os.environ.get("REDIS_URL"))

    # -- set-up --------------------------------------------------------------

    def start_redis(self) -> None:
        if self.given_redis:
            # Someone else's Redis: write only under a prefix of our own.
            os.environ.setdefault("SAGA_DEMO_PREFIX", f"saga-demo-{uuid.uuid4().hex[:8]}")
            print(f"Using the Redis in REDIS_URL, under key prefix {os.environ['SAGA_DEMO_PREFIX']!r}")
            return
        from celery_saga.redis_server import RedisServer

        self.redis = RedisServer(prefer_package=True).start()
        os.environ["REDIS_URL"] = self.redis.url
        os.environ.setdefault("SAGA_DEMO_PREFIX", "shop")
        print(f"Started a private Redis on 127.0.0.1:{self.redis.port} (pid {self.redis.proc.pid})")

    def start_workers(self) -> None:
        host = socket.gethostname()
        for service in SERVICES:
            log = open(os.path.join(self.logdir, f"{service}.log"), "wb")  # noqa: SIM115 - closed with the worker
            cmd = [
                sys.executable, "-m", "celery", "-A", f"example_project.{service}", "worker",
                "-Q", service, "-n", f"{service}@{host}", "-P", "prefork", "-c", "2", "-E", "-l", "INFO",
                "--without-gossip", "--without-mingle", "--without-heartbeat",
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            self.workers.append((service, proc))
            print(f"Started the {service} worker (pid {proc.pid}): celery -A example_project.{service} worker")
        from example_project.app import app

        wanted = {f"{s}@{host}" for s in SERVICES}
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            answered = {name for reply in app.control.ping(timeout=0.5) for name in reply}
            if wanted <= answered:
                print(f"All workers are ready; their logs are in {self.logdir}")
                return
            for service, proc in self.workers:
                if proc.poll() is not None:
                    raise RuntimeError(f"the {service} worker exited; see {self.logdir}/{service}.log")
        raise RuntimeError(f"workers did not answer within 40s; see the logs in {self.logdir}")

    # -- the orders ----------------------------------------------------------

    def place_orders(self) -> None:
        from example_project.orders import place_order

        print()
        run = uuid.uuid4().hex[:6]
        for label, order in ORDERS:
            res = place_order.apply_async(kwargs=order, idempotency_key=f"order-{order['order_id']}-{run}")
            self.results.append((label, res))
            print(f"Placed {label!r}: saga {res.id} (the start returned at once: {res.status.value})")
        print()
        self.watch()

    def watch(self, timeout: float = 40) -> None:
        seen: dict[str, str] = {}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = True
            for label, res in self.results:
                state = res.state()
                line = " ".join(f"{s.name.split('.')[-1]}={_short(s)}" for s in state.steps)
                summary = f"{state.status.value:<12} {line}"
                if seen.get(res.id) != summary:
                    seen[res.id] = summary
                    print(f"  {label:<14} {summary}")
                done = done and state.status.finished
            if done:
                return
            time.sleep(0.1)
        print(f"Some sagas had not finished after {timeout}s.")

    def report(self) -> None:
        from celery_saga.timeline import render
        from example_project import ledger

        for label, res in self.results:
            state = res.state()
            took = (state.status_at - state.created_at).total_seconds() if state.status_at and state.created_at else 0
            print(f"\n=== {label}: saga {res.id} ended {state.status.value} after {took:.2f}s")
            if state.failed_step:
                print(f"    failed step: {state.failed_step}: {state.error}")
            print("    " + render(state).replace("\n", "\n    "))
            left = {svc: list(ledger.effects(svc, res.id).values()) for svc in SERVICES}
            print(
                "    effects left in the services: " + (", ".join(f"{k}={v}" for k, v in left.items() if v) or "none")
            )

    # -- tear-down -----------------------------------------------------------

    def unfinished(self) -> list[str]:
        out = []
        for label, res in self.results:
            try:
                if not res.status.finished:
                    out.append(label)
            except Exception:
                out.append(label)
        return out

    def stop(self) -> None:
        # Workers first: they may still be recording outcomes in Redis.
        for _, proc in self.workers:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for service, proc in self.workers:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
            print(f"Stopped the {service} worker")
        self.workers = []
        if self.redis is not None:
            self.redis.stop()
            print("Stopped the private Redis")
            self.redis = None


def _short(step: Any) -> str:
    text = step.status.value.lower()
    if step.compensation_status is not None:
        text += f"/undo:{step.compensation_status.value.lower()}"
    return text


def main() -> int:
    started = time.monotonic()
    demo = Demo()
    # Ctrl-C reaches our whole process group; the workers run in their own
    # sessions and are stopped by us, in order.
    try:
        demo.start_redis()
        demo.start_workers()
        demo.place_orders()
        demo.report()
    except KeyboardInterrupt:
        print("\nInterrupted.")
        pending = demo.unfinished() if demo.redis is not None or demo.given_redis else []
        if pending:
            where = (
                "They stay in the Redis of REDIS_URL and finish when the workers run again."
                if demo.given_redis
                else "This demo's private Redis keeps nothing on disk, so they are discarded with it."
            )
            print(f"Sagas not finished: {', '.join(pending)}. {where}")
    except Exception as exc:
        print(f"\nThe demo failed: {exc}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        demo.stop()
    print(f"Demo finished in {time.monotonic() - started:.1f}s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
