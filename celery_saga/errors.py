"""Errors raised by celery_saga.

Every error derives from one root, so ``except SagaError`` catches them all::

    SagaError
    ├── SagaDefinitionError      a saga or step is defined wrongly; fix the code
    │   └── SagaDataError        start data the record cannot hold (also a TypeError)
    ├── SagaCompensated          get(): the saga was rolled back
    ├── SagaFailed               get(): compensation gave up
    ├── IdempotencyConflict      same idempotency key, different kwargs
    ├── SagaLocked               on_locked="reject": another saga holds the lock
    ├── SagaStoreUnavailable     the saga store (Redis) cannot take the call now
    │   └── SagaStoreMisconfigured   it refuses it: a missing ACL permission, a key of the wrong type
    ├── SagaNotFound             no record: never started, expired, or the store was reset
    ├── SagaStateError           an operator action the saga's status does not allow
    ├── SagaRecordCorrupt        a record exists but cannot be read
    └── StepResultNotSerializable a step returned something the record cannot hold
"""

from __future__ import annotations

__all__ = [
    "IdempotencyConflict",
    "SagaCompensated",
    "SagaDataError",
    "SagaDefinitionError",
    "SagaError",
    "SagaFailed",
    "SagaLocked",
    "SagaNotFound",
    "SagaRecordCorrupt",
    "SagaStateError",
    "SagaStoreMisconfigured",
    "SagaStoreUnavailable",
    "StepResultNotSerializable",
]


class SagaError(Exception):
    """Root of every error raised by celery_saga."""


class SagaDefinitionError(SagaError):
    """A saga, step or setting is defined wrongly. The message says how to fix it."""


class SagaDataError(SagaDefinitionError, TypeError):
    """Data given to a saga cannot be used: the record cannot hold it, or it is positional. Nothing was written."""


class SagaCompensated(SagaError):
    """The saga was rolled back: every completed step was compensated.

    Attributes:
        saga_id: The saga.
        step: The step concerned: the one that failed or timed out, or the one
            in flight when the saga timed out or was cancelled (None if none was).
        error: What was recorded (``"ExcType: message"``, ``"timeout: ..."``).
        reason: Why the saga was rolled back: ``"failure"``, ``"timeout"`` or ``"cancelled"``.
    """

    def __init__(self, saga_id: str, step: str | None, error: str | None, reason: str = "failure") -> None:
        self.saga_id = saga_id
        self.step = step
        self.error = error
        self.reason = reason
        what = {"failure": "failed", "timeout": "timed out", "cancelled": "was cancelled"}.get(reason, reason)
        if reason == "cancelled":
            text = f"saga {saga_id} was cancelled and compensated (step in flight: {step!r})"
        else:
            text = f"saga {saga_id} was compensated after step {step!r} {what}: {error}"
        super().__init__(text)


class SagaFailed(SagaError):
    """Compensation gave up, so some effects may not have been undone; or, past the pivot, a step gave up.

    Attributes:
        saga_id: The saga.
        step: The step concerned (see `SagaCompensated`).
        error: What was recorded for it.
        gave_up: Steps whose compensation gave up, with their last error.
        reason: Why the saga was rolled back: ``"failure"``, ``"timeout"`` or
            ``"cancelled"``; ``"forward"`` when it never rolled back: a step
            past its pivot (or the pivot, its outcome lost) ran out of
            ``saga_forward_max_retries`` (``retry_saga`` sends it again).
    """

    def __init__(
        self,
        saga_id: str,
        step: str | None,
        error: str | None,
        gave_up: dict[str, str | None],
        reason: str = "failure",
    ) -> None:
        self.saga_id = saga_id
        self.step = step
        self.error = error
        self.gave_up = gave_up
        self.reason = reason
        if reason == "forward":
            super().__init__(
                f"saga {saga_id} FAILED: step {step!r}, past the saga's point of no return, gave up ({error}); "
                f"the saga cannot roll back: fix the cause and retry it (`celery saga retry {saga_id}`)"
            )
            return
        names = ", ".join(sorted(gave_up)) or "?"
        super().__init__(
            f"saga {saga_id} FAILED: compensation gave up for {names} "
            f"after step {step!r} ended in {reason} ({error}); the effects of those steps may remain"
        )


class IdempotencyConflict(SagaError):
    """The idempotency key is already used by this saga with different kwargs."""

    def __init__(self, saga_name: str, key: str, saga_id: str) -> None:
        self.saga_name = saga_name
        self.key = key
        self.saga_id = saga_id
        super().__init__(
            f"idempotency key {key!r} of saga {saga_name!r} was already used with different kwargs "
            f"(saga {saga_id}); use a new key, or start with the same kwargs to get the existing saga"
        )


class SagaLocked(SagaError):
    """A start refused because another saga holds its lock (``on_locked="reject"``). Nothing was written.

    Attributes:
        saga_name: The saga that was not started.
        lock: The lock (``order:7``), or ``max_running of <name>`` for a running limit.
        holder: The id of the saga holding it (or the first waiting for it), "" if unknown.
    """

    def __init__(self, saga_name: str, lock: str, holder: str) -> None:
        self.saga_name = saga_name
        self.lock = lock
        self.holder = holder
        by = f"held by saga {holder}" if holder else "held"
        super().__init__(
            f"saga {saga_name!r} was not started: {lock} is {by}; on_locked='reject' refuses to wait "
            f"(on_locked='queue' waits for it)"
        )


class SagaStoreUnavailable(SagaError):
    """The saga store cannot take the call now; the same call later may succeed.

    Unreachable, read-only (a demoted primary), out of memory, loading, busy,
    failing over, or a write not yet on ``saga_redis_wait_replicas``
    replicas. Workers re-send the message, or write the outcome again, until
    it works. ``url`` has its password masked.
    """

    def __init__(self, url: str, cause: BaseException | None = None, detail: str = "", reachable: bool = False) -> None:
        self.url = url
        self.cause = cause
        what = detail or (f"{type(cause).__name__}: {cause}" if cause is not None else "no answer")
        state = "cannot take the call now" if reachable else "is unreachable"
        super().__init__(
            f"saga store {url} {state} ({what}); check that Redis runs, has memory and a primary, and that "
            f"saga_redis_url (or the broker URL) points at it"
        )


class SagaStoreMisconfigured(SagaStoreUnavailable):
    """The saga store refuses the call: the Redis user lacks a permission (NOPERM), or a key has the wrong type.

    Retried like an unavailable store, so that fixing the ACL (or the key)
    lets the sagas finish; logged at ERROR with what is missing. A step
    message whose own saga key is of the wrong type is dropped after
    ``saga_store_error_max_retries``.

    Attributes:
        wrong_type: True for a key of the wrong type (WRONGTYPE), False for a refused permission.
    """

    def __init__(self, url: str, cause: BaseException, wrong_type: bool = False) -> None:
        super().__init__(url, cause)
        self.wrong_type = wrong_type
        self.args = (
            f"saga store {url} refuses the call: {type(cause).__name__}: {cause}. Grant the saga user the "
            f"commands and key pattern listed in docs/deployments.md, or remove the key of the wrong type",
        )


class SagaNotFound(SagaError):
    """No saga record has this id: it was never started, it expired after retention, or the store was reset.

    Attributes:
        saga_id: The saga.
        reset: True if the store lost its data (a restart without
            persistence, eviction) since this process saw the saga.
    """

    def __init__(self, saga_id: str, where: str = "", reset: bool = False) -> None:
        self.saga_id = saga_id
        self.reset = reset
        suffix = f" in {where}" if where else ""
        if reset:
            super().__init__(
                f"saga {saga_id} not found{suffix}: the saga store was reset (restarted without persistence, "
                f"or its keys were evicted) and lost it"
            )
        else:
            super().__init__(f"saga {saga_id} not found or expired{suffix}")


class SagaStateError(SagaError):
    """An operator action is not allowed in the saga's current status.

    Attributes:
        saga_id: The saga.
        status: Its status when the action was refused.
        action: What was refused: ``"retry"`` or ``"purge"``.
    """

    def __init__(self, saga_id: str, status: str, action: str, allowed: str) -> None:
        self.saga_id = saga_id
        self.status = status
        self.action = action
        super().__init__(f"cannot {action} saga {saga_id}: it is {status or 'unknown'}; {allowed}")


class SagaRecordCorrupt(SagaError):
    """A saga record exists but cannot be parsed."""

    def __init__(self, saga_id: str, detail: str) -> None:
        self.saga_id = saga_id
        super().__init__(
            f"saga record {saga_id} is corrupt: {detail}; inspect the Redis hash, "
            f"or remove it with `celery -A <app> saga purge {saga_id}` if the saga is over"
        )


class StepResultNotSerializable(SagaError, TypeError):
    """A step returned a value the saga record cannot hold.

    Its function ran, so its effect may be there: the step is recorded
    UNKNOWN and compensated blind.

    Attributes:
        step: The step.
        path: Where in the result the value is (``"result"``, ``"result.items[2].price"``).
        type_name: The type of that value.
    """

    def __init__(self, step: str, path: str, type_name: str, storable: str = "") -> None:
        self.step = step
        self.path = path
        self.type_name = type_name
        super().__init__(
            f"step {step!r} returned a value the saga record cannot hold: {path} is of type {type_name}; "
            f"it is compensated blind, since its effect may be there. Return {storable or 'JSON types'}"
        )
