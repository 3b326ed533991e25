"""Where the saga store lives: its URL, read the way Celery reads broker URLs, and the redis-py client for it.

================================================  ===================================================
``redis://``, ``rediss://`` (TLS), ``unix://``    one Redis server (redis-py's ``Redis.from_url``)
``sentinel://host:26379[;sentinel://host2:...]``  the primary that Sentinel names, followed through
                                                  failovers; ``master_name`` (and ``sentinel_kwargs``)
                                                  come from ``saga_redis_transport_options``, as
                                                  Celery's ``broker_transport_options`` give them
``redis+cluster://host:port[,host:port...]``      a Redis Cluster (``rediss+cluster://`` for TLS)
================================================  ===================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelManagedConnection

from ..errors import SagaDefinitionError

__all__ = ["SCHEMES", "Target", "connect", "mask_url", "parse"]

SCHEMES = ("redis://", "rediss://", "unix://", "sentinel://", "redis+cluster://", "rediss+cluster://")

Kind = Literal["single", "sentinel", "cluster"]


_PASSWORD = re.compile(r"(://[^:/@;]*:)[^@/;]*@")


def mask_url(url: str) -> str:
    """The URL (or ``;``-separated URLs, or a cluster's ``host:port,...``) with every password as ``**``."""
    return _PASSWORD.sub(r"\1**@", url)


@dataclass(frozen=True)
class Target:
    """A parsed saga store location."""

    url: str
    kind: Kind
    #: Sentinel: (host, port) of each sentinel; cluster: of each startup node.
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        return mask_url(self.url)


def parse(url: str, options: dict[str, Any] | None = None) -> Target:
    """Read a saga store URL; ``options`` are ``saga_redis_transport_options``.

    Raises:
        SagaDefinitionError: the URL has a scheme the store cannot use, or a
            Sentinel URL comes without ``master_name``. The password is masked.
    """
    opts = dict(options or {})
    if not isinstance(url, str) or not url.startswith(SCHEMES):
        raise SagaDefinitionError(
            f"the saga store URL {mask_url(str(url))!r} cannot be used: saga_redis_url takes {', '.join(SCHEMES)} URLs"
        )
    if url.startswith("sentinel://"):
        parts = [urlsplit(part) for part in url.split(";") if part.strip()]
        if not opts.get("master_name"):
            raise SagaDefinitionError(
                f"the saga store URL {mask_url(url)!r} is a Sentinel URL: name the primary with "
                f"saga_redis_transport_options = {{'master_name': ...}} (as broker_transport_options does for Celery)"
            )
        first = parts[0]
        return Target(
            url,
            "sentinel",
            tuple(_host_port(p.hostname, p.port, 26379, url) for p in parts),
            username=unquote(first.username) if first.username else None,
            password=unquote(first.password) if first.password else opts.get("password"),
            db=int(first.path.strip("/") or opts.get("db") or 0),
            options=opts,
        )
    if "+cluster://" in url.split("?", 1)[0]:
        scheme, rest = url.split("://", 1)
        userinfo, _, hosts = rest.rpartition("@")
        hosts = hosts.split("/", 1)[0].split("?", 1)[0]
        user, _, password = userinfo.partition(":")
        nodes = []
        for hostport in filter(None, hosts.split(",")):
            split = urlsplit(f"redis://{hostport}")
            nodes.append(_host_port(split.hostname, split.port, 6379, url))
        if not nodes:
            raise SagaDefinitionError(f"the saga store URL {mask_url(url)!r} names no cluster node (host:port)")
        return Target(
            url,
            "cluster",
            tuple(nodes),
            username=unquote(user) or None,
            password=unquote(password) or None,
            tls=scheme.startswith("rediss"),
            options=opts,
        )
    return Target(url, "single", options=opts)


def _host_port(host: str | None, port: int | None, default: int, url: str) -> tuple[str, int]:
    if not host:
        raise SagaDefinitionError(f"the saga store URL {mask_url(url)!r} has a part without a host")
    return host, port or default


class _PrimaryConnection(SentinelManagedConnection):
    """A connection to the primary Sentinel names, also dropped on a READONLY inside a script.

    redis-py drops a connection that gets READONLY, so that the next one asks
    Sentinel for the new primary; but a script's error names READONLY only
    in its message (Redis 6.2), and the connection would stay with the
    demoted primary for good.
    """

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            if "READONLY" in str(exc) and self.connection_pool.is_master:
                self.disconnect()  # type: ignore[no-untyped-call]
                raise redis.ConnectionError(f"the primary was demoted: {exc}") from exc
            raise


def connect(target: Target) -> redis.Redis | RedisCluster:
    """A client for ``target``; nothing connects until the first command."""
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        # Transitions are de-duplicated by id, so retrying them is safe.
        "retry": Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), 3),
    }
    if target.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],  # type: ignore[no-untyped-call]
            username=target.username,
            password=target.password,
            ssl=target.tls,
            **common,
        )
    if target.kind == "sentinel":
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(target.hosts),
            sentinel_kwargs=target.options.get("sentinel_kwargs") or {},
            socket_connect_timeout=5,
            socket_timeout=5,
        )
        client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call, unused-ignore]
            target.options["master_name"],
            username=target.username,
            password=target.password,
            db=target.db,
            connection_class=_PrimaryConnection,
            **common,
        )
        return client
    return redis.Redis.from_url(target.url, health_check_interval=30, **common)
