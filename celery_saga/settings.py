"""The ``saga_*`` settings, read from ``app.conf``.

=================================== ============ =====================================
setting                             default      meaning
=================================== ============ =====================================
saga_redis_url                      broker URL   saga store (the broker's, if Redis or Sentinel):
                                                 redis://, rediss://, unix://, sentinel://,
                                                 redis+cluster://, rediss+cluster://
saga_redis_transport_options        None         Sentinel's master_name, sentinel_kwargs ...
                                                 (the broker's, with a Sentinel broker URL)
saga_index_shards                   16           index shards (hash tags); the same everywhere
saga_redis_wait_replicas            0            replicas each transition must reach (WAIT)
saga_redis_wait_timeout             1.0          seconds WAIT waits for them
saga_key_prefix                     ``"saga"``   prefix of every key celery_saga writes
saga_retention                      86400        seconds a COMPLETED saga is kept (1 day, like
                                                 Celery's result_expires)
saga_compensated_retention          None         seconds a COMPENSATED saga is kept (None: as
                                                 saga_retention)
saga_failed_retention               None         seconds a FAILED saga is kept (None: until
                                                 purged; FAILED sagas are the dead-letter list)
saga_late_outcome_window            86400        seconds after a rollback ended during which a
                                                 late outcome of a step still counts (swept)
saga_dedup_window                   600          seconds a transition's reply is kept for a
                                                 call sent again (client retries, redelivery)
saga_compensation_retry_backoff     1            first retry delay, seconds (float ok)
saga_compensation_retry_backoff_max 600          cap of the retry delay, seconds
saga_compensation_max_retries       None         None retries a compensation forever
saga_forward_retry_backoff          1            first delay before a retriable step (after
                                                 the pivot) is sent again, seconds
saga_forward_retry_backoff_max      600          cap of that delay, seconds
saga_forward_max_retries            None         None retries a retriable step forever
saga_default_step_timeout           300          deadline of steps that set none; None
                                                 (set explicitly) for no deadline
saga_sweep_interval                 0.5          seconds between a worker's deadline sweeps
saga_sweeper                        True         False: no sweeper thread in workers (run
                                                 ``celery saga sweep`` processes instead)
saga_worker_heartbeat               5            seconds between a worker's liveness writes
saga_worker_lost_after              None         seconds without a liveness write after which a
                                                 worker is lost and its running steps with it
                                                 (None: 3 x saga_worker_heartbeat)
saga_send_events                    None         ``task-saga-*`` events (None: as ``-E``)
saga_redact_keys                    ()           keys masked wherever saga values are shown:
                                                 kwargs, results, exceptions, error texts,
                                                 ``celery saga show``, the web view
saga_config_warnings                True         False: no configuration warning at worker start
saga_max_data_depth                 64           how deeply saga data, event data and step
                                                 results may nest (dicts, lists); at most 200
saga_store_error_max_retries        20           times a step message whose saga id names a key
                                                 that is no saga record is sent again, then
                                                 dropped (None: for ever)
saga_enqueue_in_transition          True         push a stage's messages in the transition that
                                                 dispatches it, when the broker is the store's
                                                 Redis server and database (celery_saga.enqueue)
=================================== ============ =====================================
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from celery import Celery

from .errors import SagaDefinitionError
from .store.connect import parse

__all__ = [
    "MAX_DATA_DEPTH_LIMIT",
    "SETTING_NAMES",
    "SagaSettings",
    "default_step_timeout",
    "max_data_depth",
    "raw_conf",
    "redact_keys",
    "timeout_seconds",
]

_DEFAULTS: dict[str, Any] = {
    "saga_redis_url": None,
    "saga_key_prefix": "saga",
    "saga_retention": 24 * 3600,
    "saga_late_outcome_window": 24 * 3600,
    "saga_dedup_window": 600,
    "saga_compensation_retry_backoff": 1.0,
    "saga_compensation_retry_backoff_max": 600.0,
    "saga_compensation_max_retries": None,
    "saga_forward_retry_backoff": 1.0,
    "saga_forward_retry_backoff_max": 600.0,
    "saga_forward_max_retries": None,
    "saga_default_step_timeout": 300.0,
    "saga_sweep_interval": 0.5,
    "saga_worker_heartbeat": 5.0,
    "saga_index_shards": 16,
    "saga_redis_wait_replicas": 0,
    "saga_redis_wait_timeout": 1.0,
    "saga_max_data_depth": 64,
    "saga_store_error_max_retries": 20,
    "saga_enqueue_in_transition": True,
}

#: Every setting `SagaSettings.from_app` reads.
SETTING_NAMES = (
    *_DEFAULTS,
    "saga_redis_transport_options",
    "saga_compensated_retention",
    "saga_failed_retention",
    "saga_worker_lost_after",
)

#: The largest ``saga_max_data_depth``: a prefork worker's main process pickles each
#: message's data for its pool, and about 480 levels of nesting raised RecursionError
#: there, killing the worker. A message nests a few levels more than its saga data.
MAX_DATA_DEPTH_LIMIT = 200

_BROKER_STORES = ("redis://", "rediss://", "unix://", "sentinel://")


def _number(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (positive and value == 0):
        what = "a number > 0" if positive else "a number >= 0"
        raise SagaDefinitionError(f"app.conf.{name} must be {what} (seconds), not {value!r}")
    return float(value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SagaDefinitionError(f"app.conf.{name} must be True or False, not {value!r}")
    return value


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SagaDefinitionError(f"app.conf.{name} must be an int >= {minimum}, not {value!r}")
    return value


@dataclass(frozen=True)
class SagaSettings:
    """The settings of one app. The compensation settings are copied into each saga at start."""

    redis_url: str
    key_prefix: str
    retention: float
    compensation_retry_backoff: float
    compensation_retry_backoff_max: float
    compensation_max_retries: int | None
    default_step_timeout: float | None = 300.0
    sweep_interval: float = 0.5
    redis_options: dict[str, Any] = field(default_factory=dict)
    index_shards: int = 16
    wait_replicas: int = 0
    wait_timeout: float = 1.0
    #: None: as ``retention``.
    compensated_retention: float | None = None
    #: None: kept until purged.
    failed_retention: float | None = None
    late_outcome_window: float = 24 * 3600.0
    dedup_window: float = 600.0
    #: Steps after a pivot: sent again after a failure or a lost outcome, with this backoff.
    forward_retry_backoff: float = 1.0
    forward_retry_backoff_max: float = 600.0
    forward_max_retries: int | None = None
    #: How deeply data and results may nest (``check`` in `celery_saga.codec`).
    max_data_depth: int = 64
    #: Times a message whose saga id names a key that is no saga record is sent again
    #: before it is dropped; None: for ever.
    store_error_max_retries: int | None = 20
    #: Seconds between a worker's liveness writes, and without one before it counts as lost.
    worker_heartbeat: float = 5.0
    worker_lost_after: float = 15.0
    #: Push a stage's messages in the transition that dispatches it (`celery_saga.enqueue`).
    enqueue_in_transition: bool = True

    @classmethod
    def from_app(cls, app: Celery) -> SagaSettings:
        conf = app.conf

        def get(name: str) -> Any:
            value = conf.get(name)
            return _DEFAULTS[name] if value is None else value

        url, options = get("saga_redis_url"), conf.get("saga_redis_transport_options")
        if url is None:
            broker = conf.broker_url or ""
            if not isinstance(broker, str) or not broker.startswith(_BROKER_STORES):
                raise SagaDefinitionError(
                    "celery_saga needs a Redis saga store: set app.conf.saga_redis_url "
                    "(it defaults to the broker URL only when the broker is Redis or Redis Sentinel)"
                )
            url = broker
            if broker.startswith("sentinel://") and options is None:
                # The broker's own Sentinel settings: master_name, sentinel_kwargs.
                options = conf.broker_transport_options
        if options is not None and not isinstance(options, dict):
            raise SagaDefinitionError(f"app.conf.saga_redis_transport_options must be a dict, not {options!r}")
        parse(str(url), options)  # a URL the store cannot use fails here, with the schemes it takes
        prefix = get("saga_key_prefix")
        if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}"):
            raise SagaDefinitionError(
                f"app.conf.saga_key_prefix must be a non-empty string without braces, not {prefix!r}"
            )
        max_retries = _max_retries("saga_compensation_max_retries", get("saga_compensation_max_retries"))
        heartbeat = _number("saga_worker_heartbeat", get("saga_worker_heartbeat"), positive=True)
        lost_after = _optional(conf, "saga_worker_lost_after")
        if lost_after is not None and lost_after <= heartbeat:
            raise SagaDefinitionError(
                f"app.conf.saga_worker_lost_after ({lost_after:g}s) must exceed saga_worker_heartbeat "
                f"({heartbeat:g}s), or every worker is lost between two of its liveness writes; "
                f"3 x saga_worker_heartbeat or more is safe"
            )
        return cls(
            redis_url=str(url),
            key_prefix=prefix,
            retention=_number("saga_retention", get("saga_retention"), positive=True),
            compensation_retry_backoff=_number(
                "saga_compensation_retry_backoff", get("saga_compensation_retry_backoff")
            ),
            compensation_retry_backoff_max=_number(
                "saga_compensation_retry_backoff_max", get("saga_compensation_retry_backoff_max")
            ),
            compensation_max_retries=max_retries,
            default_step_timeout=default_step_timeout(app),
            sweep_interval=_number("saga_sweep_interval", get("saga_sweep_interval"), positive=True),
            redis_options=dict(options or {}),
            index_shards=_count("saga_index_shards", get("saga_index_shards"), minimum=1),
            wait_replicas=_count("saga_redis_wait_replicas", get("saga_redis_wait_replicas"), minimum=0),
            wait_timeout=_number("saga_redis_wait_timeout", get("saga_redis_wait_timeout"), positive=True),
            compensated_retention=_optional(conf, "saga_compensated_retention"),
            failed_retention=_optional(conf, "saga_failed_retention"),
            late_outcome_window=_number("saga_late_outcome_window", get("saga_late_outcome_window"), positive=True),
            dedup_window=_number("saga_dedup_window", get("saga_dedup_window"), positive=True),
            forward_retry_backoff=_number("saga_forward_retry_backoff", get("saga_forward_retry_backoff")),
            forward_retry_backoff_max=_number("saga_forward_retry_backoff_max", get("saga_forward_retry_backoff_max")),
            forward_max_retries=_max_retries("saga_forward_max_retries", get("saga_forward_max_retries")),
            max_data_depth=max_data_depth(app),
            store_error_max_retries=_limit(conf, "saga_store_error_max_retries"),
            worker_heartbeat=heartbeat,
            worker_lost_after=3 * heartbeat if lost_after is None else lost_after,
            enqueue_in_transition=_flag("saga_enqueue_in_transition", get("saga_enqueue_in_transition")),
        )

    def saga_copy(self) -> str:
        """The settings every worker applies to a saga, as stored in its record.

        The compensation backoff is drawn from these by the transition that
        decides a retry (``transitions.lua``), so all workers agree on it.
        """
        copy = asdict(self)
        for local in ("redis_url", "key_prefix", "default_step_timeout", "sweep_interval", "redis_options"):
            del copy[local]
        for local in ("index_shards", "wait_replicas", "wait_timeout", "dedup_window"):
            del copy[local]
        for local in (
            "max_data_depth",
            "store_error_max_retries",
            "worker_heartbeat",
            "worker_lost_after",
            "enqueue_in_transition",
        ):
            del copy[local]
        return json.dumps(copy, sort_keys=True)


_UNSET = object()


def _max_retries(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SagaDefinitionError(f"app.conf.{name} must be None (retry forever) or an int >= 0, not {value!r}")
    return value


def _limit(conf: Any, name: str) -> int | None:
    """A retry limit whose default is a number: None, set explicitly, for no limit."""
    value = conf.get(name)
    if value is None and not _explicit(conf, name):
        value = _DEFAULTS[name]
    return _max_retries(name, value)


def _optional(conf: Any, name: str) -> float | None:
    value = conf.get(name)
    return None if value is None else _number(name, value, positive=True)


def _explicit(conf: Any, name: str) -> bool:
    """True if ``name`` was set, even to None (``conf.get(name)`` alone cannot tell)."""
    return conf.get(name, _UNSET) is not _UNSET


def timeout_seconds(what: str, value: Any) -> float | None:
    """Validate a timeout: a number > 0 (seconds), or None for no deadline."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value != value:
        raise SagaDefinitionError(f"{what} must be a number of seconds > 0, or None for no deadline, not {value!r}")
    if value == float("inf"):
        raise SagaDefinitionError(f"{what} must be finite; use None for no deadline")
    return float(value)


def default_step_timeout(app: Celery) -> float | None:
    """``saga_default_step_timeout``, validated; readable without a saga store configured."""
    conf = app.conf
    value = conf.get("saga_default_step_timeout")
    if value is None and not _explicit(conf, "saga_default_step_timeout"):
        value = _DEFAULTS["saga_default_step_timeout"]
    return timeout_seconds("app.conf.saga_default_step_timeout", value)


def max_data_depth(app: Celery) -> int:
    """``saga_max_data_depth``, validated; readable without a saga store configured."""
    value = app.conf.get("saga_max_data_depth")
    if value is None:
        return int(_DEFAULTS["saga_max_data_depth"])
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DATA_DEPTH_LIMIT:
        raise SagaDefinitionError(
            f"app.conf.saga_max_data_depth must be an int from 1 to {MAX_DATA_DEPTH_LIMIT}, not {value!r}: a prefork "
            f"worker pickles each message's data, and data nested much deeper exceeds Python's recursion limit there"
        )
    return value


def redact_keys(app: Celery) -> tuple[str, ...]:
    """``saga_redact_keys``, validated: keys masked in every saga's shown arguments."""
    return keys_to_redact(app.conf.get("saga_redact_keys") or (), "app.conf.saga_redact_keys")


def keys_to_redact(value: Any, what: str) -> tuple[str, ...]:
    """Validate a list of keys to redact."""
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise SagaDefinitionError(f"{what} must be a list of key names, like ['card_number'], not {value!r}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise SagaDefinitionError(f"{what} must hold non-empty strings (key names), not {key!r}")
    return tuple(sorted(set(value)))


def raw_conf(app: Celery, names: tuple[str, ...]) -> tuple[Any, ...]:
    """The raw values ``names`` come from in ``app.conf``, read cheaply, to tell whether they changed.

    ``app.conf.get`` of an unset key costs about 10 µs, and hot paths (every
    step, every start) only need to know that nothing changed since they
    last derived something from the settings.
    """
    conf = app.conf
    maps = getattr(conf, "maps", None)
    if not maps:
        return tuple(conf.get(name, _UNSET) for name in names)
    # _UNSET tells a key set to None from one not set at all.
    return tuple(m.get(name, _UNSET) for m in maps for name in names)
