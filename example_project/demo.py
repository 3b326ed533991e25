"""`make demo`: run the order saga for real and show what happened.

Starts a private Redis (or uses ``REDIS_URL``), one worker per service as
subprocesses, and places five orders: one that completes, one whose card is
declined, one whose carrier hangs past the shipping deadline (``reason``
"timeout": the shipment is compensated blind, then again when the carrier
answers late), one that the demo cancels while its payment waits for the
customer (``reason`` "cancelled"), and a big order (``big_order``) that waits
for a manager's approval, which the demo gives, and whose warehouse request,
after the payment (its pivot), fails twice and is sent again until it
succeeds. It prints live progress, then each saga's
timeline, what the services did and what is left, then stops everything it
started: workers first, then Redis (with ``REDIS_URL``, it deletes every key
it wrote there instead). Ctrl-C stops it all the same.
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datetime import datetime

    from celery_saga import SagaState, StepRecord

SERVICES = ("inventory", "payments", "shipping")
ROOT = Path(__file__).resolve().parent.parent

# Orders by kind, as `python -m example_project.place KIND` names them. Card
# 4000-0000-0000-0002 is declined; 4000-0027-6000-3184 waits for the customer to
# confirm the payment; address "slow" makes the carrier hang past the shipping
# deadline; address "nowhere" cannot be shipped to.
ORDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "happy": ("happy order", {"order_id": 1, "items": ["book", "lamp"], "amount": 30,
                              "card": "4242-4242-4242-4242", "address": "1 Main St"}),
    "declined": ("card declined", {"order_id": 2, "items": ["chair"], "amount": 80,
                                   "card": "4000-0000-0000-0002", "address": "2 High St"}),
    "slow": ("slow carrier", {"order_id": 3, "items": ["desk"], "amount": 120,
                              "card": "4242-4242-4242-4242", "address": "slow"}),
    "unconfirmed": ("unconfirmed payment", {"order_id": 4, "items": ["rug"], "amount": 60,
                                              "card": "4000-0027-6000-3184", "address": "4 Low St"}),
    "undeliverable": ("undeliverable", {"order_id": 5, "items": ["sofa"], "amount": 400,
                                        "card": "4242-4242-4242-4242", "address": "nowhere"}),
    "big": ("big order", {"order_id": 6, "items": ["piano"], "amount": 5000,
                          "card": "4242-4242-4242-4242", "address": "6 Grand Ave"}),
}  # fmt: skip
#: The saga each kind of order starts (by default place_order).
SAGA_OF = {"big": "big_order"}
#: The orders `make demo` places, in order.
DEMO_ORDERS = ("happy", "declined", "slow", "unconfirmed", "big")
#: Where each gated order waits: its step, and the answer the demo gives when it opens the gate.
GATES = {"slow": ("shipping.ship_order", "open"), "unconfirmed": ("payments.charge_card", "confirmed")}
SWEEP_NOTE = (
    "Deadlines are swept by every worker (a thread in each) and by "
    "`celery -A example_project.app saga sweep`, should you run one."
)


class Demo:
    def __init__(self) -> None:
        self.redis: Any = None
        self.workers: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.logdir = tempfile.mkdtemp(prefix="celery-saga-demo-")
        self.results: list[tuple[str, str, Any]] = []  # (kind, label, SagaResult)
        self.opened: set[str] = set()  # sagas whose gate was opened
        self.given_redis = bool(os.environ.get("REDIS_URL"))

    # -- the web view --------------------------------------------------------

    def serve_web(self) -> None:
        """Serve ``celery saga web`` on the demo's sagas until Ctrl-C (the web extra)."""
        try:
            from celery_saga.web import WebSettings, serve
        except ImportError:
            print("The web view needs Tornado: pip install 'celery-saga-engine[web]'")
            return
        from example_project.app import app

        port = _free_port(5557)
        url = f"http://127.0.0.1:{port}/"
        print()
        print(f"The web view of these sagas: {url}  (celery -A example_project.app saga web)")
        print("Press Ctrl-C to stop it and clean up.")
        serve(app, "127.0.0.1", port, WebSettings(enable_actions=True), ready=lambda: print(f"serving {url}"))

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
        print(SWEEP_NOTE)
        print()
        run = uuid.uuid4().hex[:6]
        for kind in DEMO_ORDERS:
            label, order = ORDERS[kind]
            res = saga_of(kind).apply_async(kwargs=order, idempotency_key=f"order-{order['order_id']}-{run}")
            self.results.append((kind, label, res))
            print(f"Placed {label!r}: saga {res.id} (the start returned at once: {res.status.value})")
        print()
        self.watch()

    def watch(self, timeout: float = 40) -> None:
        """Print each saga's progress as it changes, and play the customer and the carrier."""
        from celery_saga import CompensationStatus, StepStatus
        from example_project import ledger

        seen: dict[str, str] = {}
        noted: set[tuple[str, str]] = set()
        cancelled: set[str] = set()
        approved: set[str] = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            settled = True
            for kind, label, res in self.results:
                state = res.state()
                for s in state.steps:
                    if s.status is StepStatus.UNKNOWN and s.stopped_by == "timeout" and (res.id, s.name) not in noted:
                        noted.add((res.id, s.name))
                        print(
                            f"  -> {label}: {s.name} had no outcome {s.timeout or 0:g}s after it was dispatched: "
                            "a worker's sweeper stopped waiting for it, and the saga compensates it blind"
                        )
                line = " ".join(f"{s.name.split('.')[-1]}={_short(s)}" for s in state.steps)
                summary = f"{state.status.value:<12} {line}"
                if seen.get(res.id) != summary:
                    seen[res.id] = summary
                    print(f"  {label:<20} {summary}")
                if (
                    kind == "big"
                    and res.id not in approved
                    and state.step("wait:approval").status is StepStatus.DISPATCHED
                ):
                    approved.add(res.id)
                    answer = res.signal("approval", {"approved_by": "the manager"})
                    print(
                        f"  -> {label}: it waits for a manager's approval, holding no worker; the manager approves "
                        f"it: SagaResult.signal('approval') -> {answer}"
                    )
                    settled = False
                    continue
                charge = state.step("payments.charge_card")
                if kind == "unconfirmed" and res.id not in cancelled and charge.status is StepStatus.RUNNING:
                    cancelled.add(res.id)
                    print(
                        f"  -> {label}: the payment waits for the customer, who gives up: the shop cancels "
                        f"the order, SagaResult.cancel() -> {res.cancel()}"
                    )
                    settled = False
                    continue
                gate = GATES.get(kind)
                if gate and state.status.finished and res.id not in self.opened:
                    waiting = state.step(gate[0])
                    if waiting.status is StepStatus.UNKNOWN and (
                        waiting.compensation_status is CompensationStatus.COMPENSATED and waiting.late_status is None
                    ):
                        self.opened.add(res.id)
                        ledger.open_gate(f"{res.id}:{gate[0]}", gate[1])
                        print(f"  -> {label}: {LATE[kind]}")
                settled = settled and state.status.finished and not unsettled(state)
            if settled:
                return
            time.sleep(0.1)
        print(f"Some sagas had not settled after {timeout}s.")

    def report(self) -> None:
        from celery_saga import SagaCompensated, SagaFailed, SagaStatus
        from celery_saga.views import render_timeline

        for _, label, res in self.results:
            state = res.state()
            took = (state.status_at - state.created_at).total_seconds() if state.status_at and state.created_at else 0
            why = f" ({state.reason})" if state.reason and state.status is not SagaStatus.COMPLETED else ""
            print(f"\n=== {label}: saga {res.id} ended {state.status.value}{why} after {took:.2f}s")
            if state.failed_step:
                print(f"    failed step: {state.failed_step}: {state.error}")
            print("    " + render_timeline(state).replace("\n", "\n    "))
            for line in step_notes(state):
                print(f"    {line}")
            if state.status is not SagaStatus.COMPLETED:
                print("    what the services did:")
                for line in journal_lines(state):
                    print(f"      {line}")
            print(f"    effects left in the services: {effects_left(res.id)}")

        print("\nOutcomes, as SagaResult.get() reports them:")
        for _, label, res in self.results:
            try:
                res.get(timeout=5)
                outcome = "COMPLETED"
            except SagaCompensated as exc:
                outcome = f"COMPENSATED  reason={exc.reason:<9}  rollback started by {exc.step}"
            except SagaFailed as exc:
                outcome = f"FAILED  compensations that gave up: {', '.join(exc.gave_up)}"
            print(f"  {label:<20} {outcome}")

    # -- tear-down -----------------------------------------------------------

    def unfinished(self) -> list[str]:
        out = []
        for _, label, res in self.results:
            try:
                if not res.status.finished:
                    out.append(label)
            except Exception:
                out.append(label)
        return out

    def release_gates(self) -> None:
        """Let steps still waiting at a gate go on, so that their workers can stop at once."""
        try:
            from example_project import ledger

            for kind, _, res in self.results:
                if kind in GATES and res.id not in self.opened:
                    self.opened.add(res.id)
                    ledger.open_gate(f"{res.id}:{GATES[kind][0]}", "released")
        except Exception as exc:
            print(f"Could not release the steps waiting at a gate ({exc}); their workers may take longer to stop")

    def stop(self) -> None:
        self.release_gates()
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
        if self.given_redis:
            self.delete_keys()
        if self.redis is not None:
            self.redis.stop()
            print("Stopped the private Redis")
            self.redis = None

    def delete_keys(self) -> None:
        """Someone else's Redis: delete everything the demo wrote there, all of it under its own prefix."""
        import redis

        prefix = os.environ["SAGA_DEMO_PREFIX"]
        try:
            with redis.Redis.from_url(os.environ["REDIS_URL"]) as client:
                keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for i in range(0, len(keys), 500):
                    client.unlink(*keys[i : i + 500])
            print(f"Deleted the {len(keys)} keys the demo wrote under prefix {prefix!r} in REDIS_URL")
        except redis.RedisError as exc:
            print(f"Could not delete the demo's keys under prefix {prefix!r}: {exc}")


#: What the demo says when it opens a gate, by order kind.
LATE = {
    "slow": "the carrier answers at last; the saga keeps the late success and runs a second compensation round",
    "unconfirmed": "the customer confirms the payment after all, too late: a second compensation round refunds it",
}


def saga_of(kind: str) -> Any:
    """The saga an order of ``kind`` starts."""
    from example_project import orders

    return getattr(orders, SAGA_OF.get(kind, "place_order"))


def _short(step: StepRecord) -> str:
    text = step.status.value.lower()
    if step.compensation_status is not None:
        text += f"/undo:{step.compensation_status.value.lower()}"
    if step.late_status is not None:
        text += f"/late:{step.late_status.value.lower()}"
    if step.second_round is not None:
        text += f"/undo2:{step.second_round.status.value.lower()}"
    return text


def unsettled(state: SagaState) -> list[str]:
    """Steps compensated blind whose late outcome has not arrived, or whose second round has not ended."""
    from celery_saga import CompensationStatus, StepStatus

    ended = (CompensationStatus.COMPENSATED, CompensationStatus.GAVE_UP)
    out = []
    for s in state.steps:
        if s.status is not StepStatus.UNKNOWN or s.compensation is None:
            continue
        if s.late_status is None or (
            s.late_status is StepStatus.COMPLETED and (s.second_round is None or s.second_round.status not in ended)
        ):
            out.append(s.name)
    return out


def _at(when: datetime | None, origin: datetime | None) -> str:
    return f"+{(when - origin).total_seconds():.2f}s" if when is not None and origin is not None else "-"


def step_notes(state: SagaState) -> list[str]:
    """What the timeline table does not say: why the saga stopped waiting for a step, and what was not undone."""
    from celery_saga import SagaStatus, StepStatus

    lines = []
    if state.pivot:
        passed = "passed: from there it only went forward" if state.passed_pivot else "not passed"
        lines.append(f"the pivot (point of no return) {state.pivot} was {passed}")
    for s in state.steps:
        if s.forward_retries:
            lines.append(
                f"{s.name} came after the pivot: it failed {s.forward_retries} time(s) and was sent again, with the "
                f"same idempotency key, until it {'succeeded' if s.status is StepStatus.COMPLETED else 'gave up'}"
            )
        if s.name.startswith("wait:") and s.status is StepStatus.COMPLETED:
            lines.append(f"{s.name}: the event came with {s.result}")
        if s.status is StepStatus.CANCELLED:
            lines.append(f"{s.name} was fenced while still queued ({s.stopped_by}): it never ran")
        elif s.status is StepStatus.UNKNOWN:
            text = f"{s.name}: the saga stopped waiting for it ({s.stopped_by})"
            if s.compensation:
                text += " and compensated it blind, with step_result=None"
            if s.late_status is StepStatus.COMPLETED:
                text += f"; it succeeded late, {_at(s.late_at, state.created_at)}, returning {s.late_result}"
                if s.second_round is not None:
                    text += f", and round 2 compensated that: {s.second_round.status.value}"
            elif s.late_status is not None:
                text += f"; it ended late, {_at(s.late_at, state.created_at)}: {s.late_status.value}"
            elif s.compensation:
                text += "; if it succeeds late, a second round compensates it with its result"
            lines.append(text)
        elif s.status is StepStatus.COMPLETED and s.compensation is None and state.status is not SagaStatus.COMPLETED:
            lines.append(f"{s.name} has nothing to undo (compensate=None), so its effect stays")
    return lines


def journal_lines(state: SagaState) -> list[str]:
    """The services' journal of one saga: every effect applied and undone, and by which round."""
    from example_project import ledger

    origin = state.created_at.timestamp() if state.created_at else 0.0
    lines = []
    for e in ledger.journal(state.saga_id):
        if e["round"]:
            who = f"undo of {e['step']}, round {e['round']}" + ("" if e["result_known"] else ", result unknown")
        else:
            who = e["step"]
        effect = f" {e['effect']}" if e["effect"] else ""
        at = f"+{e['at'] - origin:.2f}s"
        lines.append(f"{at:>7} {e['service']:<9} {who}: {e['what']}{effect}")
    return lines or ["nothing"]


def effects_left(saga_id: str) -> str:
    from example_project import ledger

    left = {svc: list(ledger.effects(svc, saga_id).values()) for svc in SERVICES}
    return ", ".join(f"{k}={v}" for k, v in left.items() if v) or "none"


def _wants_web() -> bool:
    forced = os.environ.get("SAGA_DEMO_WEB", "")
    return forced == "1" or (forced != "0" and sys.stdin.isatty() and sys.stdout.isatty())


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


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
        if _wants_web():
            demo.serve_web()
    except KeyboardInterrupt:
        print("\nInterrupted.")
        pending = demo.unfinished() if demo.redis is not None or demo.given_redis else []
        if pending:
            where = (
                "They are deleted with the rest of the demo's keys in REDIS_URL."
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
