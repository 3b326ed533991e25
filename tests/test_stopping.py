"""``celery saga sweep`` and ``celery saga web`` stop within 5 s of SIGINT or SIGTERM, whatever they are doing.

Each command runs as a subprocess started the way CI and ``nohup`` start
one: with SIGINT *ignored*, as a non-interactive shell leaves it for a
background job. Its saga store is a ``redis-server`` of the test's own,
which the test freezes (SIGSTOP: every call waits for a reply) or stops
(connections refused) to put the command inside a Redis call, or in front
of an unreachable store. Each state is tried with both signals, in two
commands side by side.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from celery_saga.redis_server import RedisServer, free_port
from tests.cli_app import ENV_STORE, cli_env
from tests.helpers import patience, wait_for
from tests.subprocs import ROOT

#: The bound the commands promise, from the signal to the exit. Not scaled:
#: it is a claim about the commands, which wait on nothing slow once signalled.
STOP_WITHIN = 5.0

STATES = ("sleeping", "in-a-redis-call", "store-unreachable")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pending_requests(port: int) -> int:
    """Bytes clients sent to the server on ``port`` that it has not read: a call waiting for its reply."""
    pending = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                rx_queue = int(fields[4].split(":")[1], 16)
                if local_port == port:
                    pending += rx_queue
    return pending


@pytest.fixture
def store() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)  # thawed, so that it can stop


def _start(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", *args],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_ignore_sigint,
        )


def _stops_in_time(proc: subprocess.Popen[bytes], sig: signal.Signals, log_path: Path) -> None:
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(STOP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(patience(15))
        pytest.fail(f"still running {STOP_WITHIN}s after {sig.name}:\n{log_path.read_text()}")
    took = time.monotonic() - sent
    output = log_path.read_text()
    assert code == 0, output
    assert "Traceback" not in output, output
    assert took < STOP_WITHIN


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _run_both(
    tmp_path: Path, commands: list[list[str]], store: RedisServer, state: str, busy: Callable[[], None]
) -> None:
    """Start both commands, bring them to ``state``, then stop the first with SIGINT and the second with SIGTERM."""
    # Given two commands on a saga store of the test's own
    env = {**cli_env(store.url, f"stop-{uuid.uuid4().hex[:8]}", "q-stop"), ENV_STORE: store.url}
    procs = []
    for sig, args in zip(SIGNALS, commands, strict=True):
        log_path = tmp_path / f"{sig.name}.log"
        procs.append((_start(args, env, log_path), sig, log_path))
    try:
        for proc, _, log_path in procs:
            wait_for(lambda p=log_path: "Ctrl-C to stop" in p.read_text(), 60, "the command to start")  # type: ignore[misc]
            assert proc.poll() is None
        # When the store is frozen, or gone, with calls under way
        assert store.proc is not None
        if state == "in-a-redis-call":
            store.proc.send_signal(signal.SIGSTOP)
        elif state == "store-unreachable":
            store.stop()
        busy()
        # Then SIGINT and SIGTERM each stop one of them within the bound
        for proc, sig, log_path in procs:
            _stops_in_time(proc, sig, log_path)
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(patience(15))


@pytest.mark.parametrize("state", STATES)
def test_sweep_stops_within_5s_of_a_signal(tmp_path: Path, store: RedisServer, state: str) -> None:
    # "sleeping": one sweep a minute, so it is between passes; otherwise it sweeps every 50 ms.
    interval = "60" if state == "sleeping" else "0.05"

    def busy() -> None:
        if state == "in-a-redis-call":
            wait_for(lambda: _pending_requests(store.port) >= 2, 10, "both sweepers to wait on the frozen store")

    _run_both(tmp_path, [["sweep", "--interval", interval]] * 2, store, state, busy)


@pytest.mark.parametrize("state", STATES)
def test_web_stops_within_5s_of_a_signal(tmp_path: Path, store: RedisServer, state: str) -> None:
    pytest.importorskip("tornado")
    ports = [free_port(), free_port()]
    requests: list[threading.Thread] = []

    def request(port: int) -> None:
        # The page lists sagas: it waits on the store until the command is stopped.
        with pytest.raises((urllib.error.URLError, ConnectionError, TimeoutError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=patience(30)).read()

    def busy() -> None:
        if state == "sleeping":
            return
        for port in ports:
            thread = threading.Thread(target=request, args=(port,), daemon=True)
            thread.start()
            requests.append(thread)
        if state == "in-a-redis-call":
            wait_for(lambda: _pending_requests(store.port) >= 2, 10, "both pages to wait on the frozen store")

    _run_both(tmp_path, [["web", "--port", str(port)] for port in ports], store, state, busy)
    for thread in requests:
        thread.join(patience(30))


def test_web_on_a_port_in_use_says_so_in_one_line(tmp_path: Path, store: RedisServer) -> None:
    pytest.importorskip("tornado")
    # Given a port something else listens on
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # When the web view is asked to serve there
        env = {**cli_env(store.url, f"stop-{uuid.uuid4().hex[:8]}", "q-stop"), ENV_STORE: store.url}
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", "web", "--port", str(port)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=patience(60),
        )
    # Then it exits with one line saying what to do, and no traceback
    assert done.returncode == 69, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "choose another --port" in done.stderr
