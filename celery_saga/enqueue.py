"""Messages the transition pushes itself: a stage enqueued in the same atomic call that decides it.

When the Celery broker is kombu's Redis transport on the very server and
database that hold the saga store (the default: the store is the broker's
URL), the transition that dispatches a stage (a start, a step's done) can
push that stage's messages too. That is one round trip less per step on the
saga's critical path, and no window in which a stage is decided but not
published (before, a crash there was repaired only at the step's deadline).

The messages are built by Celery and kombu's own code: ``send_task`` with a
producer whose channel keeps what it would push instead of pushing it. So
they are byte for byte what kombu's Redis transport sends, to the same key:
the global key prefix, the priority queue, and the same routing (the default
exchange by queue name; a direct exchange by its ``_kombu.binding.*`` set,
which the transition reads). Celery's ``before_task_publish`` and
``after_task_publish`` signals fire as the message is built.

The transition pushes them only if it dispatches that very stage with the
data they carry (``transitions.lua``: messages in the transition). In every
other case (a sibling finished last, a topic or fanout exchange, another
broker: RabbitMQ, another Redis, Sentinel, a cluster store;
``saga_enqueue_in_transition = False``) the caller publishes after the
transition, as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery
from kombu import messaging

from . import codec
from .settings import SagaSettings, raw_conf
from .state import fold
from .store import SagaStore

__all__ = ["Enqueuer", "Prebuilt", "enqueuer"]

logger = logging.getLogger("celery_saga")

# Marks the end of a call's ARGV that carries messages (transitions.lua: take_enqueue).
_MARK = "!enq"
# The connection fields that name one server and database.
_SAME = ("host", "port", "path", "db", "username")


@dataclass(frozen=True)
class Prebuilt:
    """A stage's messages, built for the transition to push; ``args`` is how the call carries them."""

    stage: int
    #: sha1 of the stage's data parts (a JSON array), which the transition checks against the record's.
    digest: str
    #: Six strings per message: kind, key, routing key, key prefix, priority suffix, payload.
    kept: tuple[str, ...]

    @property
    def args(self) -> tuple[str, ...]:
        return (str(self.stage), self.digest, *self.kept, str(len(self.kept) // 6), _MARK)


class _Unbuildable(Exception):
    """The message is one a transition cannot push (a topic or fanout exchange, an expiring queue)."""


class _Keeping:
    """A kombu Redis channel that keeps the messages it would push, with where they would go.

    Everything but ``basic_publish`` is the real channel's, so declaring a
    queue (once per connection, as any producer does) really declares it.
    """

    def __init__(self, channel: Any) -> None:
        self._channel = channel
        self.kept: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._channel, name)

    def basic_publish(self, message: dict[str, Any], exchange: str, routing_key: str, **kwargs: Any) -> None:
        # What kombu's virtual Channel.basic_publish and the Redis Channel._put do, but the LPUSH.
        ch = self._channel
        ch._inplace_augment_message(message, exchange, routing_key)
        pri = ch.priority(ch._get_message_priority(message, reverse=False))
        suffix = f"{ch.sep}{pri}" if pri else ""
        prefix = ch.global_keyprefix or ""
        expiring = ch._expires
        payload = _kombu_dumps(message)
        if not exchange:
            if not routing_key or (expiring and routing_key in expiring):
                raise _Unbuildable(f"queue {routing_key!r}")
            self.kept += ["q", prefix + routing_key + suffix, "", "", "", payload]
        elif ch.typeof(exchange).type == "direct" and not expiring:
            self.kept += ["x", prefix + ch.keyprefix_queue % exchange, routing_key, prefix, suffix, payload]
        else:
            raise _Unbuildable(f"exchange {exchange!r} ({ch.typeof(exchange).type})")


def _kombu_dumps(message: dict[str, Any]) -> str:
    # The very function kombu's Redis transport serializes a message with.
    from kombu.transport import redis as kombu_redis

    dumps: Callable[[Any], str] = kombu_redis.dumps  # type: ignore[attr-defined]
    return dumps(message)


class Enqueuer:
    """Builds stages for the transitions of one app, in one process."""

    def __init__(self, app: Celery, channel: Any) -> None:
        self.app = app
        self._channel = channel
        self._lock = threading.Lock()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._channel.connection.client.release()

    def build(self, stage: int, parts: str, publish: Callable[[Any], None]) -> Prebuilt | None:
        """The messages ``publish(producer)`` sends for ``stage`` (data parts ``parts``); None if unbuildable."""
        with self._lock:
            keeping = _Keeping(self._channel)
            make: Callable[..., Any] = messaging.Producer
            producer = make(keeping, auto_declare=False)
            try:
                publish(producer)
            except Exception as exc:
                # An _Unbuildable message (as StageNotPublished's cause), or a
                # failure the publish after the transition meets again, and reports.
                logger.debug("celery_saga: stage %d published after the transition: %r", stage, exc.__cause__ or exc)
                return None
            if not keeping.kept:
                return None
            return Prebuilt(stage, hashlib.sha1(parts.encode()).hexdigest(), tuple(keeping.kept))


def next_parts(stage_data: str, result_json: str) -> str:
    """The data parts of the next stage: a lone step's stage's, and its result."""
    return f"{stage_data[:-1]},{result_json}]"


def data_of(parts: str) -> dict[str, Any]:
    """Saga data from its parts (start kwargs, then results), folded as a transition's reply is."""
    values = codec.loads(parts)
    return fold(values[0], values[1:])


# What an Enqueuer is made from: its process, its store, and the app's broker settings.
_MADE_FROM = (
    "broker_url",
    "broker_write_url",
    "broker_transport_options",
    "saga_enqueue_in_transition",
    "saga_redis_url",
)
# app -> (what it was made from, the Enqueuer or None, and for a None that was a failure to connect, when to try again).
_ENQUEUERS: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], Enqueuer | None, float | None]] = (
    weakref.WeakKeyDictionary()
)
_CREATING = threading.Lock()
#: Seconds before a broker that could not be reached is tried again (published after the transition meanwhile).
RETRY_CONNECT_AFTER = 30.0


def enqueuer(app: Celery, store: SagaStore) -> Enqueuer | None:
    """The app's Enqueuer, or None if its stages are published after the transition (see the module)."""
    # A forked child makes its own (a channel is one process's connection), and so
    # does a change of the broker's settings (a test's own key prefix, say).
    made_from = (os.getpid(), id(store), raw_conf(app, _MADE_FROM))
    cached = _ENQUEUERS.get(app)
    if cached is not None and cached[0] == made_from and (cached[2] is None or time.monotonic() < cached[2]):
        return cached[1]
    with _CREATING:
        cached = _ENQUEUERS.get(app)
        if cached is not None and cached[0] == made_from and (cached[2] is None or time.monotonic() < cached[2]):
            return cached[1]
        if cached is not None and cached[1] is not None and cached[0][0] == os.getpid():
            cached[1].close()
        try:
            made, retry_at = _make(app, store), None
        except _Unreachable:
            made, retry_at = None, time.monotonic() + RETRY_CONNECT_AFTER
        _ENQUEUERS[app] = (made_from, made, retry_at)
        return made


class _Unreachable(Exception):
    """The broker did not answer: no Enqueuer for now."""


def _make(app: Celery, store: SagaStore) -> Enqueuer | None:
    if not SagaSettings.from_app(app).enqueue_in_transition:
        return None
    client = getattr(store, "client", None)
    target = getattr(store, "target", None)
    if client is None or getattr(target, "kind", None) != "single":
        return None  # a cluster, whose keys are in many slots; Sentinel, whose master may move
    connection = app.connection_for_write()
    try:
        # One attempt, not the broker's retry policy: a broker that is down costs the
        # start that meets it once per RETRY_CONNECT_AFTER, and its publish says why.
        connection.connect()
        channel = connection.default_channel
    except Exception as exc:
        connection.release()
        logger.debug("celery_saga: no broker channel; stages are published after the transition", exc_info=True)
        raise _Unreachable() from exc
    from kombu.transport import redis as kombu_redis

    if type(channel) is not kombu_redis.Channel:
        channel.connection.client.release()
        return None
    broker = channel.client.connection_pool.connection_kwargs
    ours = client.connection_pool.connection_kwargs
    if any(broker.get(k) != ours.get(k) for k in _SAME):
        channel.connection.client.release()
        return None
    return Enqueuer(app, channel)
