"""`make demo` end to end, in subprocesses: a full run, and runs cut short by Ctrl-C before and during the orders."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from celery_saga.redis_server import PRIVATE_SERVER_KEY, RedisServer
from tests.helpers import patience

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)  # the demo starts its own Redis
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _sigint_as_from_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _pids(text: str) -> list[int]:
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    assert len(pids) == 4, text  # Redis and three workers
    return pids


def test_demo_runs_orders_to_completed_and_compensated_and_stops_everything() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    # Five orders: two complete, three are rolled back, each for its own reason.
    assert text.count("ended COMPLETED") == 2 and text.count("ended COMPENSATED") == 3, text
    for label, reason in (
        ("card declined", "failure"),
        ("slow carrier", "timeout"),
        ("unconfirmed payment", "cancelled"),
    ):
        assert f"=== {label}: saga " in text and re.search(rf"{label}\s+COMPENSATED\s+reason={reason}\b", text), text
    assert re.search(r"happy order\s+COMPLETED$", text, re.M), text
    # The big order waited for its approval, holding no worker, and passed its pivot; the
    # warehouse request after it failed twice and was sent again until it succeeded.
    assert "the manager approves it: SagaResult.signal('approval') -> True" in text
    assert re.search(r"big order\s+COMPLETED$", text, re.M), text
    assert "wait:approval: the event came with {'approved_by': 'the manager'}" in text
    assert "the pivot (point of no return) payments.charge_card was passed" in text
    assert "shipping.notify_warehouse came after the pivot: it failed 2 time(s) and was sent again" in text
    assert re.search(r"shipping\.notify_warehouse\s+step\s+COMPLETED\s+3\s", text), text
    assert re.search(r"compensation\s+COMPENSATED", text)  # the timeline has compensation rows
    # The slow carrier: its deadline is swept, the shipment is cancelled blind (the
    # booking found by its key), and the late success is compensated again.
    assert "deadlines are swept by every worker" in text.lower() and "saga sweep" in text
    assert "shipping.ship_order had no outcome 3s after it was dispatched" in text
    assert "shipping.ship_order: the saga stopped waiting for it (timeout) and compensated it blind" in text
    assert "undo of shipping.ship_order, round 1, result unknown: undone" in text
    assert "undo of shipping.ship_order, round 2: nothing to undo" in text
    # The cancelled order: cancelled while the payment waited, refunded blind
    # (nothing yet), then the late charge refunded by the second round.
    assert "SagaResult.cancel() -> True" in text
    assert "payments.charge_card: the saga stopped waiting for it (cancelled) and compensated it blind" in text
    assert "undo of payments.charge_card, round 1, result unknown: nothing to undo" in text
    assert "undo of payments.charge_card, round 2: undone" in text
    assert len(re.findall(r"compensation 2\s+COMPENSATED", text)) == 2  # both late successes, in the timelines
    assert "had not settled" not in text
    took = float(re.findall(r"Demo finished in ([\d.]+)s", text)[-1])
    assert took < 60
    pids = _pids(text)
    assert not [p for p in pids if _alive(p)]
    assert text.index("Stopped the shipping worker") < text.index("Stopped the private Redis")


@pytest.mark.parametrize(
    "when",
    [
        pytest.param("All workers are ready", id="before-the-orders"),
        # The slow carrier still hangs at its gate, which the demo opens so its worker stops at once.
        pytest.param("the shop cancels the order", id="while-the-carrier-hangs"),
    ],
)
def test_demo_interrupted_with_ctrl_c_cleans_up_without_a_traceback(when: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # As from a terminal: a shell without job control starts background jobs ignoring SIGINT.
        preexec_fn=_sigint_as_from_a_terminal,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if when in line or time.monotonic() > deadline:
            break
    interrupted = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=patience(60))
    stopped_in = time.monotonic() - interrupted
    text = "".join(lines) + rest
    assert when in text, text
    assert proc.returncode == 0, text
    assert "Interrupted." in text and "Traceback" not in text
    assert "Stopped the private Redis" in text
    assert text.index("Stopped the shipping worker") < text.index("Stopped the private Redis")
    if when == "the shop cancels the order":
        assert re.search(r"Sagas not finished: .*slow carrier", text), text
        assert stopped_in < 8, text  # not the carrier's 10 s, nor the 15 s before a SIGKILL
    pids = _pids(text)
    assert not [p for p in pids if _alive(p)]


def test_demo_on_someone_elses_redis_deletes_every_key_it_wrote() -> None:
    # Given a Redis of someone else's, holding a key of theirs
    with RedisServer() as server, redis.Redis.from_url(server.url) as client:
        client.delete(PRIVATE_SERVER_KEY)  # as if it were not one of ours
        client.set("theirs", "1")
        out = subprocess.run(
            [sys.executable, "-m", "example_project.demo"],
            cwd=ROOT,
            env={**_env(), "REDIS_URL": server.url},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "ended COMPLETED" in out.stdout
        # Then nothing of the demo is left there, and nothing of theirs was touched
        assert re.search(r"Deleted the \d+ keys the demo wrote under prefix 'saga-demo-\w+'", out.stdout), out.stdout
        assert sorted(client.keys("*")) == [b"theirs"]


def test_demo_in_a_terminal_ends_by_serving_the_web_view_until_ctrl_c() -> None:
    import json
    import pty
    import urllib.request

    # Given the demo run in a terminal (a pseudo-terminal: stdin and stdout are a tty)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env={k: v for k, v in _env().items() if k != "SAGA_DEMO_WEB"},
        stdin=child,
        stdout=child,
        stderr=child,
        preexec_fn=_sigint_as_from_a_terminal,
    )
    os.close(child)
    seen = b""
    try:
        deadline = time.monotonic() + 90
        while b"serving http://" not in seen and time.monotonic() < deadline and proc.poll() is None:
            try:
                seen += os.read(main, 65536)
            except OSError:
                break
        text = seen.decode(errors="replace")
        # Then it reports as before, and prints the web view's URL
        assert "ended COMPLETED" in text and "The web view of these sagas: http://" in text, text
        url = re.findall(r"serving (http://127\.0\.0\.1:\d+/)", text)[-1]
        with urllib.request.urlopen(url + "api/sagas", timeout=patience(10)) as response:
            sagas = json.loads(response.read())["sagas"]
        assert sorted(s["status"] for s in sagas) == ["COMPENSATED"] * 3 + ["COMPLETED"] * 2
        with urllib.request.urlopen(url + f"saga/{sagas[0]['id']}", timeout=patience(10)) as response:
            assert "Timeline" in response.read().decode()
        # When Ctrl-C is pressed, it stops serving and cleans up as it always does
        proc.send_signal(signal.SIGINT)
        proc.wait(patience(60))
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        text = seen.decode(errors="replace")
        assert proc.returncode == 0, text
        assert "Stopped the private Redis" in text and "Traceback" not in text
        assert not [p for p in _pids(text) if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(patience(10))
        os.close(main)
