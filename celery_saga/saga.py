"""Defining a saga (``Saga``; its steps are read by `celery_saga.stages`), and starting one."""

from __future__ import annotations

import copy
import dataclasses
import decimal
import functools
import hashlib
import importlib
import inspect
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, current_app
from celery.canvas import Signature

from . import codec
from .enable import enable_apps_with_steps
from .enqueue import enqueuer
from .errors import IdempotencyConflict, SagaDataError, SagaDefinitionError, SagaLocked, SagaStoreUnavailable
from .follow import follow
from .introspect import is_proxy
from .locks import ON_LOCKED, lock_resources, lock_templates, render_locks, resource_name
from .messages import StageNotPublished, message_serializer, publish_stage
from .nested import CHILD_ENDED_TASK
from .plan import Plan, StepSpec, remember_plan
from .registry import MISSING, DefinedSaga, register_saga
from .result import SagaResult
from .search import search_keys_of, search_values
from .settings import SagaSettings, default_step_timeout, max_data_depth, redact_keys, timeout_seconds
from .stages import check_events, children_of, flatten, leaf, parallel, pivot_stage, step_name
from .state import SagaStatus
from .step import StepRef
from .store import Outcome, SagaStore, StartRequest, Transition
from .store.base import definition_digest
from .stores import settings_of, store_for

__all__ = ["Saga", "parallel", "saga_id_for"]

logger = logging.getLogger("celery_saga")

_ROUTING_OPTIONS = ("queue", "exchange", "routing_key", "priority")
_ID_NAMESPACE = uuid.UUID("6c6a1f55-3c1e-4b4e-9a51-3f5d1b8f1e2a")


class Saga:
    """A named sequence of steps, each an ordinary Celery task with a compensation.

    Args:
        name: The saga name, used in records, indexes and idempotency.
        steps: A list (or Celery ``chain``) of steps; ``parallel(...)`` or a
            Celery ``group`` for steps that run together.
        app: The Celery app; defaults to the app of the first task.
        timeout: Seconds the saga's forward progress may take, from its start
            to its last step's outcome; then everything in flight is timed out
            and compensated. Compensation is not bounded by it. None (the
            default) leaves only the step deadlines. It stops applying once
            the pivot has completed.
        pivot: The step that is the saga's point of no return: its name, or its task.
            Steps before it are compensatable; once it has completed, the
            steps of later stages are retriable: a failure or a lost outcome
            sends them again (``saga_forward_retry_backoff``), and the saga
            never rolls back. It must be alone in its stage.
        search_keys: Start kwargs that identify the business entity (at most
            8, such as ``("order_id", "customer_id")``): their values (strings
            or integers) are indexed with the start, for ``list_sagas(where=...)``,
            ``celery saga list --where`` and the web view's search.
        lock: A semantic lock, or a list of them: format strings over the
            start kwargs (``"order:{order_id}"``). Sagas of any name that
            format the same lock never run at once: each holds it from its
            start until it ends COMPLETED or COMPENSATED (a FAILED one keeps
            it until retried, purged or ``celery saga unlock``).
        on_locked: ``"queue"`` (the default): a start whose lock is held is
            accepted and waits, first come first served; ``"reject"``: it
            raises `SagaLocked` and writes nothing.
        lock_timeout: Seconds a start may wait for its locks; then it ends
            COMPENSATED with reason ``"lock_timeout"``. Default: the saga's
            timeout (None: no limit).
        max_running: At most this many sagas of this name hold their start
            at once (RUNNING or COMPENSATING); the others wait, as for a lock.
    """

    def __init__(
        self,
        name: str,
        steps: Any,
        app: Celery | None = None,
        timeout: float | None = None,
        pivot: Any = None,
        search_keys: Sequence[str] = (),
        lock: str | Sequence[str] | None = None,
        on_locked: str = "queue",
        lock_timeout: Any = MISSING,
        max_running: int | None = None,
    ) -> None:
        if not isinstance(name, str) or not name or any(c in name for c in " \t\r\n:"):
            raise SagaDefinitionError(f"saga name must be a non-empty string without whitespace or ':', not {name!r}")
        if not _is_text(name):
            raise SagaDefinitionError(f"saga name {name!r} has a lone surrogate: it is no text in UTF-8")
        self.name = name
        self.timeout = timeout_seconds(f"saga {name!r}: timeout", timeout)
        #: The start kwargs indexed as business keys.
        self.search_keys: tuple[str, ...] = search_keys_of(name, search_keys)
        #: Its locks (format strings), what a start does when one is held, and its running limit.
        self.locks: tuple[str, ...] = lock_templates(name, lock)
        if on_locked not in ON_LOCKED:
            raise SagaDefinitionError(f"saga {name!r}: on_locked must be 'queue' or 'reject', not {on_locked!r}")
        self.on_locked = on_locked
        self.lock_timeout = (
            lock_timeout if lock_timeout is MISSING else timeout_seconds(f"saga {name!r}: lock_timeout", lock_timeout)
        )
        if max_running is not None and (
            isinstance(max_running, bool) or not isinstance(max_running, int) or max_running < 1
        ):
            raise SagaDefinitionError(f"saga {name!r}: max_running must be a whole number of sagas, 1 or more")
        self.max_running = max_running
        #: The module that defined the saga: what a worker imports to have it (the crash-point explorer's -A).
        self.module: str | None = _caller_module()
        if not is_proxy(steps) and isinstance(steps, (list, tuple)) and not steps:
            raise SagaDefinitionError(f"saga {name!r} has no steps; give it at least one")
        stages = [[leaf(x) for x in stage] for stage in flatten(steps)]
        if not stages:
            raise SagaDefinitionError(f"saga {name!r} has no steps; give it at least one")
        seen: set[str] = set()
        for stage in stages:
            for ref in stage:
                if ref.name in seen:
                    raise SagaDefinitionError(
                        f"saga {name!r} has two steps named {ref.name!r}: give one another name "
                        f"with step(task, name='...')"
                    )
                seen.add(ref.name)
        check_events(name, stages)
        #: The sagas used as steps of this one, by name.
        self.children: dict[str, DefinedSaga] = children_of(name, steps)
        self._refs = stages
        #: The pivot step's name, or None; ``pivot_stage`` is its stage (None: no pivot).
        self.pivot: str | None = step_name(pivot)
        self.pivot_stage: int | None = pivot_stage(name, stages, self.pivot)
        self._app = app or next((r.app for stage in stages for r in stage if r.app is not None), None)
        # The plan, and the app it was built for: a saga of shared tasks follows the current app.
        self._plan: tuple[Celery, Plan] | None = None
        self._defined: _Definition | None = None
        # Checked when its app is finalized, and read by the worker's checks.
        register_saga(self)
        # Its app enables the saga hooks when finalized, as for a @saga_step
        # task: the saga's steps may all be undecorated tasks.
        enable_apps_with_steps(self._app)
        if self._app is not None and self._app.finalized:
            self.plan()

    def __repr__(self) -> str:
        return f"<Saga {self.name!r}: {' -> '.join('|'.join(r.name for r in s) for s in self._refs)}>"

    @property
    def app(self) -> Celery:
        """The app the saga runs on: ``app=``, else its tasks' app, else the current app.

        Steps made with ``@shared_task`` belong to no app: like Celery's own
        canvas, the saga then uses the current app when it starts.
        """
        if self._app is not None:
            return self._app
        app: Celery = current_app._get_current_object()
        return app

    def belongs_to(self, app: Celery) -> bool:
        """True if this saga runs on ``app``: it was given, or (with shared tasks) ``app`` has its steps."""
        if self._app is not None:
            return self._app is app
        tasks = app._tasks  # not app.tasks: that would finalize the app
        return any(ref.task in tasks for stage in self._refs for ref in stage)

    def plan(self) -> Plan:
        """The checked plan. Needs the app finalized: compensation names are checked against its tasks."""
        app = self.app
        if self._plan is None or self._plan[0] is not app:
            self._plan = (app, self._build_plan(app))
        return self._plan[1]

    def plan_digest(self) -> str:
        """The digest new starts of this definition record (its plan and settings); running sagas keep theirs."""
        return self._definition(self.app, settings_of(self.app)).digest

    def _build_plan(self, app: Celery) -> Plan:
        tasks = app.tasks  # finalizes the app, which is what checking needs
        default_timeout = default_step_timeout(app)
        # Keys the app redacts everywhere travel in the plan, with each step's own.
        app_secrets = set(redact_keys(app))
        stages = []
        for k, stage in enumerate(self._refs):
            specs = []
            for ref in stage:
                if ref.child is not None:
                    specs.append(StepSpec(ref.name, ref.task, ref.compensation, stage=k, timeout=None, child=ref.child))
                    continue
                if ref.event is not None:
                    specs.append(
                        StepSpec(ref.name, "", None, stage=k, timeout=ref.timeout, event=ref.event, reject=ref.reject)
                    )
                    continue
                local = tasks.get(ref.task)
                if ref.compensation is not None and local is not None and ref.compensation not in tasks:
                    raise SagaDefinitionError(
                        f"saga {self.name!r}: step {ref.name!r} is compensated by {ref.compensation!r}, "
                        f"but app {app.main!r} has no task of that name; check the name or import its module"
                    )
                bound = dict(ref.bound)
                if ref.args:
                    bound = self._bind_args(ref, local, bound)
                options = {**_routing(local), **_routing_of(ref.options)}
                comp_options = _routing(tasks.get(ref.compensation)) if ref.compensation else {}
                _dumps(bound, f"saga {self.name!r}: the arguments bound to step {ref.name!r}", max_data_depth(app))
                specs.append(
                    StepSpec(
                        ref.name,
                        ref.task,
                        ref.compensation,
                        ref.compensate_on_failure,
                        bound,
                        options,
                        k,
                        comp_options,
                        timeout=default_timeout if ref.timeout is MISSING else ref.timeout,
                        heartbeat_timeout=ref.heartbeat_timeout,
                        redact=tuple(sorted(app_secrets | set(ref.redact))),
                    )
                )
            stages.append(tuple(specs))
        return Plan(tuple(stages))

    def _bind_args(self, ref: StepRef, local: Any, bound: dict[str, Any]) -> dict[str, Any]:
        if local is None:
            raise SagaDefinitionError(
                f"saga {self.name!r}: step {ref.name!r} binds positional arguments, but its task is not "
                f"in this app, so they cannot be named; bind them by keyword"
            )
        try:
            params = inspect.signature(local.run).bind_partial(*ref.args)
        except TypeError as exc:
            raise SagaDefinitionError(f"saga {self.name!r}: step {ref.name!r}: {exc}") from exc
        return {**params.arguments, **bound}

    def id_for(self, idempotency_key: str) -> str:
        """The saga id a start with ``idempotency_key`` gets (the same for every start with that key)."""
        return saga_id_for(self.name, idempotency_key)

    def with_deadlines_at_most(self, seconds: float) -> Saga:
        """A copy whose step deadlines are at most ``seconds``, for test runs that must not wait for them.

        Steps with no deadline (``timeout=None``) keep none. The copy is not
        registered: it is the same saga to the app and its workers, which
        read each record's own definition.
        """
        cap = timeout_seconds("deadline cap", seconds)
        if cap is None:
            raise ValueError("with_deadlines_at_most needs a number of seconds")
        default = default_step_timeout(self.app)
        refs = []
        for stage in self._refs:
            capped = []
            for ref in stage:
                if ref.event is not None and ref.timeout is None:
                    capped.append(ref)  # a wait for ever stays one: the test delivers its event
                    continue
                timeout = default if ref.timeout is MISSING else ref.timeout
                capped.append(dataclasses.replace(ref, timeout=None if timeout is None else min(timeout, cap)))
            refs.append(capped)
        twin = copy.copy(self)
        twin._refs, twin._plan, twin._defined = refs, None, None
        return twin

    # -- starting ---------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> SagaResult:
        """Start the saga with ``kwargs`` as its data. Returns at once."""
        if args:
            raise SagaDataError(f"saga {self.name!r} takes keyword arguments only, got positional {args!r}")
        return self.apply_async(kwargs=kwargs)

    def delay_on_commit(self, *args: Any, **kwargs: Any) -> None:
        """Start the saga with ``kwargs`` once the surrounding Django transaction commits (never if it rolls back).

        As Celery's ``Task.delay_on_commit``: outside a transaction (autocommit) it starts at once.
        See `apply_async_on_commit`.
        """
        if args:
            raise SagaDataError(f"saga {self.name!r} takes keyword arguments only, got positional {args!r}")
        self.apply_async_on_commit(kwargs=kwargs)

    def apply_async_on_commit(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        using: str | None = None,
        **options: Any,
    ) -> None:
        """`apply_async` once the Django transaction of database ``using`` commits (never if it rolls back).

        The kwargs and options are checked now: what `apply_async` would
        refuse (data it cannot store, positional args, an idempotency key that
        is no string) raises here, inside the transaction. It returns nothing,
        as the saga does not exist yet; with ``idempotency_key=`` its id is
        known already: ``Saga.id_for(key)``.

        A process that dies between the commit and the start starts nothing:
        the commit does not wait for Redis. Give an ``idempotency_key`` derived
        from the row the transaction wrote (``f"order-{order.pk}"``), and a
        job that starts the saga again for rows that have none is safe to run
        any time: a start with the same key is the same saga.

        Raises:
            SagaDefinitionError: Django is not installed.
        """
        try:
            transaction = importlib.import_module("django.db.transaction")
        except ImportError as exc:
            raise SagaDefinitionError(
                f"saga {self.name!r}: apply_async_on_commit needs Django (pip install django); "
                "outside Django, call apply_async after your own commit"
            ) from exc
        if args:
            raise SagaDataError(f"saga {self.name!r} takes keyword arguments only, got positional {list(args)!r}")
        data = dict(kwargs or {})
        _dumps(data, f"saga {self.name!r}: kwargs", settings_of(self.app).max_data_depth)
        key = options.get("idempotency_key")
        if key is not None and (not isinstance(key, str) or not key):
            raise SagaDataError("idempotency_key must be a non-empty string")
        unknown = set(options) - {"idempotency_key", "on_complete", "on_failure", "timeout"}
        if unknown:
            raise TypeError(f"apply_async_on_commit() got unexpected options {sorted(unknown)}")
        search_values(self.name, self.search_keys, data)
        render_locks(self.name, self.locks, data)  # a lock's missing kwarg too
        self.plan()  # a broken definition fails here, not after the commit
        transaction.on_commit(functools.partial(self.apply_async, None, data, **options), using=using)

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        on_complete: Signature | None = None,
        on_failure: Signature | None = None,
        timeout: Any = MISSING,
    ) -> SagaResult:
        """Start the saga: write its record, publish its first steps, and return a handle.

        Args:
            args: Not supported; sagas take keyword data only.
            kwargs: The saga data. Must be JSON-serializable.
            idempotency_key: Starting twice with one key (per saga name) gives the
                same saga; the saga id is derived from it.
            on_complete: Sent once with the saga id first when the saga completes.
            on_failure: Sent once with the saga id first when it ends compensated or failed.
            timeout: Overrides the saga's ``timeout`` for this start (None: no
                saga deadline). Starting again with the same idempotency key
                compares the kwargs only, not the timeout.

        Raises:
            SagaDataError: ``kwargs`` cannot be serialized as JSON.
            IdempotencyConflict: ``idempotency_key`` was used with other kwargs.
            SagaStoreUnavailable: the saga store cannot be reached; nothing was published.
        """
        if args:
            raise SagaDataError(f"saga {self.name!r} takes keyword arguments only, got positional {list(args)!r}")
        data = dict(kwargs or {})
        depth = settings_of(self.app).max_data_depth
        kwargs_json = _dumps(data, f"saga {self.name!r}: kwargs", depth)
        callbacks = [
            _callback_json(cb, which, depth) for cb, which in ((on_complete, "on_complete"), (on_failure, "on_failure"))
        ]
        saga_timeout = self.timeout if timeout is MISSING else timeout_seconds(f"saga {self.name!r}: timeout", timeout)
        key = idempotency_key or ""
        if idempotency_key is not None and (not isinstance(idempotency_key, str) or not idempotency_key):
            raise SagaDataError("idempotency_key must be a non-empty string")
        if not _is_text(key):
            raise SagaDataError(f"idempotency_key {key!r} has a lone surrogate: it is no text in UTF-8")
        saga_id = self.id_for(key) if key else str(uuid.uuid4())
        return self._start(saga_id, data, kwargs_json, key, callbacks, saga_timeout)

    def start_rerun(self, of: str, saga_id: str, data: dict[str, Any], callbacks: tuple[str, str]) -> SagaResult:
        """Start this saga as ``saga_id``, a re-run of saga ``of`` (`celery_saga.rerun_saga`), with no idempotency key.

        ``callbacks`` are the first saga's on_complete / on_failure (JSON, or "").
        """
        depth = settings_of(self.app).max_data_depth
        kwargs_json = _dumps(data, f"saga {self.name!r}: kwargs", depth)
        return self._start(saga_id, data, kwargs_json, "", list(callbacks), self.timeout, rerun_of=of)

    def start_as_child(self, parent_id: str, parent_gen: str, data: dict[str, Any]) -> SagaResult:
        """Start this saga as the child step of saga ``parent_id``: id ``<parent_id>:<name>``; idempotent.

        Its end is reported to the parent by a message (``celery_saga.child_ended``,
        its end callback), so the parent's record is never touched by the
        child's transitions and the two may live in different slots.
        """
        ended = self.app.signature(CHILD_ENDED_TASK, kwargs={"parent": parent_id, "parent_gen": parent_gen})
        depth = settings_of(self.app).max_data_depth
        callback = _callback_json(ended, "on_complete", depth)
        link = (parent_id, parent_gen, self.name)
        kwargs_json = _dumps(data, f"saga {self.name!r}: kwargs", depth)
        saga_id = f"{parent_id}:{self.name}"
        return self._start(saga_id, data, kwargs_json, "", [callback, callback], self.timeout, parent=link)

    def _start(
        self,
        saga_id: str,
        data: dict[str, Any],
        kwargs_json: str,
        key: str,
        callbacks: list[str],
        saga_timeout: float | None,
        parent: tuple[str, str, str] | None = None,
        rerun_of: str = "",
    ) -> SagaResult:
        app = self.app
        search = search_values(self.name, self.search_keys, data)
        locks = lock_resources(render_locks(self.name, self.locks, data), self.name, self.max_running)
        message_serializer(app)  # raises before anything is written if workers would drop the messages
        settings = settings_of(app)
        store = store_for(app)
        d = self._definition(app, settings)
        # The first deadline can be no sooner than the shortest timeout.
        first = min((x for x in (d.shortest_timeout, saga_timeout) if x is not None), default=None)
        req = StartRequest(
            saga_id=saga_id,
            gen=uuid.uuid4().hex[:12],
            name=self.name,
            # Only a start whose id another start can repeat (an idempotency
            # key, a child's derived id) compares its kwargs with the record's.
            fingerprint=hashlib.sha256(_canonical(data, kwargs_json).encode()).hexdigest() if key or parent else "",
            kwargs_json=kwargs_json,
            plan_json=d.plan_json,
            plan_digest=d.digest,
            stages=d.stages,
            retention=settings.retention,
            settings_json=d.settings_json,
            compensated_retention=settings.compensated_retention,
            failed_retention=settings.failed_retention,
            late_outcome_window=settings.late_outcome_window,
            dedup_window=settings.dedup_window,
            on_complete=callbacks[0],
            on_failure=callbacks[1],
            idempotency_key=key,
            max_retries=settings.compensation_max_retries,
            step_fields=d.step_fields,
            saga_timeout=saga_timeout,
            watch_at=None if first is None else time.time() + first,
            pivot=self.pivot or "",
            parent=parent,
            search=search,
            rerun_of=rerun_of,
            locks=locks,
            on_locked=self.on_locked,
            lock_timeout=saga_timeout if self.lock_timeout is MISSING else self.lock_timeout,
        )
        t = store.start(req, self._first_stage(app, store, req, data, d))
        if t.outcome is Outcome.CONFLICT:
            raise IdempotencyConflict(self.name, key, saga_id)
        if t.outcome is Outcome.LOCKED:
            raise SagaLocked(self.name, resource_name(t.lock), t.holder)
        remember_plan(d.digest, d.plan)
        stage0 = dataclasses.replace(t, stage=0, data=data, plan_digest=d.digest)
        if t.outcome is Outcome.CREATED:
            self._publish_first(app, store, stage0)
        elif t.status is SagaStatus.PENDING and not t.waiting:
            # A start of this saga wrote its record but may have died before
            # publishing: publish its first stage again (with the record's
            # generation); a copy of a message already sent is skipped.
            follow(app, store, dataclasses.replace(stage0, outcome=Outcome.NEXT_STAGE))
        return SagaResult(saga_id, app=app, epoch=store.epoch())

    def _definition(self, app: Celery, settings: SagaSettings) -> _Definition:
        """What every start writes about the plan and settings; derived again only when either changed."""
        plan = self.plan()
        cached = self._defined
        if cached is not None and cached.plan is plan and cached.settings is settings:
            return cached
        step_fields: list[tuple[str, str]] = []
        for spec in plan.steps:
            # A retriable step is never compensated in this saga: it has no compensation here.
            retriable = self.pivot_stage is not None and spec.stage > self.pivot_stage
            if spec.compensation is not None and not retriable:
                step_fields.append((f"comp:{spec.name}", spec.compensation))
            if spec.compensate_on_failure:
                step_fields.append((f"cof:{spec.name}", "1"))
            if spec.timeout is not None:
                step_fields.append((f"to:{spec.name}", f"{spec.timeout * 1000:.0f}"))
            if spec.reject is not None:
                step_fields.append((f"rj:{spec.name}", spec.reject))
            if spec.heartbeat_timeout is not None:
                step_fields.append((f"hbt:{spec.name}", f"{spec.heartbeat_timeout * 1000:.0f}"))
        plan_json, settings_json = plan.to_json(), settings.saga_copy()
        # One stored definition per plan and settings: records name it by digest.
        digest = definition_digest(plan_json, settings_json)
        self._defined = _Definition(
            plan,
            settings,
            plan_json,
            settings_json,
            digest,
            plan.lua_stages(),
            tuple(step_fields),
            plan.shortest_timeout(),
        )
        return self._defined

    def _first_stage(
        self, app: Celery, store: SagaStore, req: StartRequest, data: dict[str, Any], d: _Definition
    ) -> tuple[str, ...]:
        """The first stage's messages, for the start to push itself, if the broker allows (`celery_saga.enqueue`)."""
        builder = enqueuer(app, store)
        specs = [spec for spec in d.plan.stages[0] if not spec.is_wait]
        if builder is None or not specs:
            return ()
        epoch, secrets = store.epoch(), d.plan.redacted_keys
        built = builder.build(
            0,
            f"[{req.kwargs_json}]",
            lambda producer: publish_stage(
                app,
                req.saga_id,
                self.name,
                req.gen,
                specs,
                data,
                True,
                secrets,
                epoch,
                plan=d.digest,
                producer=producer,
            ),
        )
        return () if built is None else built.args

    def _publish_first(self, app: Celery, store: SagaStore, created: Transition) -> None:
        try:
            follow(app, store, created)
            return
        except StageNotPublished as exc:
            cause, unpublished = exc.__cause__ or exc, exc.unpublished
        except SagaStoreUnavailable:
            raise  # the record stays PENDING: a start again with its key publishes its first stage
        except Exception as exc:
            # Before any send, or part-way: the abort fails the steps still DISPATCHED.
            cause, unpublished = exc, tuple(spec.name for spec in self.plan().stages[0])
        # Mark the saga failed and release its idempotency key, so no orphan
        # RUNNING saga is left and the caller can simply retry.
        error = f"publish failed: {type(cause).__name__}: {cause}"
        try:
            aborted = store.abort_start(created.saga_id, created.gen, self.name, error, unpublished)
            if aborted.admitted:
                follow(app, store, dataclasses.replace(aborted, changed_from=None))  # its locks' next waiters
        except Exception:
            logger.exception("saga %s: could not mark the failed start", created.saga_id)
        raise cause  # the broker's own error, as publishing raised it


def saga_id_for(name: str, idempotency_key: str) -> str:
    """The id of the saga named ``name`` started with ``idempotency_key``."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"{name}\x00{idempotency_key}"))


def _caller_module() -> str | None:
    frame = inspect.currentframe()
    # This function's caller is Saga.__init__; its caller defined the saga.
    caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
    name = caller.f_globals.get("__name__") if caller is not None else None
    return name if isinstance(name, str) else None


@dataclass(frozen=True)
class _Definition:
    """What every start of a saga writes about its plan and settings (`Saga._definition`)."""

    plan: Plan
    settings: SagaSettings
    plan_json: str
    settings_json: str
    digest: str
    stages: str
    step_fields: tuple[tuple[str, str], ...]
    shortest_timeout: float | None


def _routing_of(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in _ROUTING_OPTIONS and v is not None}


def _routing(task: Any) -> dict[str, Any]:
    """The routing a local task sets on itself (``@app.task(queue=...)``); ``task_routes`` apply anyway."""
    return _routing_of(task._get_exec_options()) if task is not None else {}


def _canonical(data: Any, stored: str) -> str:
    """``data`` as JSON with sorted keys, the same for the same data: what a repeated start compares.

    Numbers compare by value: ``Decimal("50")``, ``Decimal("50.00")``, ``50.0``
    and ``50`` are one number, as are ``Decimal("0.1")`` and ``0.1``.
    """
    try:
        return codec.dumps(_by_value(data), sort_keys=True, separators=(",", ":"))
    except TypeError:
        # Keys of several types (1 and "a") do not sort; as stored, every key is a string.
        return codec.dumps(_by_value(codec.loads(stored)), sort_keys=True, separators=(",", ":"))


def _by_value(value: Any) -> Any:
    """``value`` with every number in one form per value: an int if integral, else a float if exact."""
    if isinstance(value, dict):
        return {k: _by_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_by_value(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float, decimal.Decimal)):
        return value
    number = value if isinstance(value, decimal.Decimal) else decimal.Decimal(repr(value))
    if not number.is_finite():
        return value
    if number == number.to_integral_value():
        return int(number)
    if decimal.Decimal(repr(float(number))) == number:
        return float(number)
    return decimal.Decimal(format(number.normalize(), "f"))


def _dumps(data: Any, what: str, max_depth: int) -> str:
    try:
        return codec.dumps(data, max_depth=max_depth)
    except (TypeError, ValueError) as exc:
        raise SagaDataError(
            f"{what} cannot be stored in the saga record: {codec.why_unstorable(data, max_depth=max_depth)}. "
            f"Pass {codec.STORABLE}; e.g. ids instead of objects"
        ) from exc


def _is_text(text: str) -> bool:
    """True unless ``text`` has a lone surrogate: it then encodes in no UTF, so Redis keys cannot hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _callback_json(sig: Signature | None, which: str, max_depth: int) -> str:
    if sig is None:
        return ""
    if not isinstance(sig, Signature):
        raise SagaDataError(f"{which} must be a Celery signature such as notify.s(), not {sig!r}")
    return _dumps(dict(sig), which, max_depth)
