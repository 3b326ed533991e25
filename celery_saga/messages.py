"""Saga messages: the headers that carry a saga's context, their task ids, and publishing them.

Every saga message is the user's own task, sent by name with the saga's
context in its headers; the step wrapper reads them on the other side. What
to publish, and when, is decided by `celery_saga.follow`; this module only
knows how.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task
from celery.exceptions import Retry
from celery.utils.saferepr import saferepr
from kombu.serialization import registry

from . import codec
from .errors import SagaDefinitionError
from .introspect import params_of
from .plan import Plan, StepSpec
from .settings import raw_conf
from .state import SagaState, StepStatus, data_before
from .tracing import saga_trace

__all__ = [
    "CHILD_ENDED_TASK",
    "CHILD_TASK",
    "UNDO_CHILD_TASK",
    "Headers",
    "MessageRejected",
    "SagaHeaders",
    "read_headers",
    "StageNotPublished",
    "parse_task_id",
    "publish_compensation",
    "message_serializer",
    "publish_stage",
    "queue_of",
    "resend",
    "send_callback",
    "task_id",
]


# The tasks of child sagas (registered on every enabled app by `celery_saga.nested`).
CHILD_TASK = "celery_saga.child"
UNDO_CHILD_TASK = "celery_saga.undo_child"
CHILD_ENDED_TASK = "celery_saga.child_ended"


class Headers:
    """Names of the message headers that carry the saga context."""

    ID = "saga_id"
    NAME = "saga_name"
    STEP = "saga_step"
    GEN = "saga_gen"
    UNDO = "saga_undo"
    BOUND = "saga_bound"
    FIRST = "saga_first"
    ROUND = "saga_round"
    KNOWN = "saga_known"
    EPOCH = "saga_epoch"
    PLAN = "saga_plan"


class MessageRejected(Exception):
    """A saga message its headers, its record or its plan do not bear out: it changes nothing.

    Anyone who can publish to the broker can send any task with any
    headers; a message is a claim, and the record decides. ``reason`` is the
    label of ``celery_saga_rejected_messages_total``: ``header`` (a header of
    the wrong type or form), ``generation`` (not a start's 12-hex token:
    ``"*"`` and ``""`` are the record's own wildcards, never a message's),
    ``task`` (not the task the plan names for that step), ``plan`` (another
    plan than the record's), ``parent`` (a child's end its record does not
    name).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class SagaHeaders:
    """The saga headers of one message, each checked for its type and form (`read_headers`).

    Attributes:
        saga_id, name, step, gen: The saga, its name, the step, and the start
            generation the message was sent for.
        compensation: A compensation (``saga_undo``), not a forward step.
        round: A compensation's round: 1, or 2 for a late success undone again.
        bound: Arguments bound in the step's signature.
        first: A first-stage step (its begin moves the saga to RUNNING).
        known: A compensation's ``result_known``; None when not sent.
        epoch: The store's epoch when it was sent ("" if not sent).
        plan: The digest of the plan the sender took the task from; "" from
            a sender older than this header (the record's is used then).
    """

    saga_id: str
    name: str
    step: str
    gen: str
    compensation: bool
    round: int
    bound: dict[str, Any]
    first: bool
    known: bool | None
    epoch: str
    plan: str


_GENERATION = re.compile(r"[0-9a-f]{12}\Z")
_DIGEST = re.compile(r"[0-9a-f]{16}\Z")
_FLAGS = (None, 0, 1, True, False)


def read_headers(get: Callable[[str], Any]) -> SagaHeaders:
    """The saga headers ``get`` returns (a request's ``get``, a dict's), checked before any transition.

    Raises:
        MessageRejected: a header has the wrong type or form.
    """

    def text(name: str, required: bool = False) -> str:
        value = get(name)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise MessageRejected("header", f"header {name} is {_brief(value)}, not a non-empty string")
        return value

    def flag(name: str) -> bool | None:
        value = get(name)
        if isinstance(value, float) or value not in _FLAGS:
            raise MessageRejected("header", f"header {name} is {_brief(value)}, not 0 or 1")
        return None if value is None else bool(value)

    saga_id, step = text(Headers.ID, required=True), text(Headers.STEP, required=True)
    gen = get(Headers.GEN)
    if not isinstance(gen, str) or not _GENERATION.match(gen):
        raise MessageRejected("generation", f"header {Headers.GEN} is {_brief(gen)}, not a start's generation")
    plan = text(Headers.PLAN)
    if plan and not _DIGEST.match(plan):
        raise MessageRejected("header", f"header {Headers.PLAN} is {_brief(plan)}, not a plan digest")
    round_ = get(Headers.ROUND)
    if round_ is None:
        round_ = 1
    if isinstance(round_, bool) or round_ not in (1, 2):
        raise MessageRejected("header", f"header {Headers.ROUND} is {_brief(round_)}, not 1 or 2")
    bound = get(Headers.BOUND)
    if bound is None:
        bound = {}
    if not isinstance(bound, dict) or not all(isinstance(k, str) for k in bound):
        raise MessageRejected("header", f"header {Headers.BOUND} is {_brief(bound)}, not a dict of arguments")
    return SagaHeaders(
        saga_id=saga_id,
        name=text(Headers.NAME),
        step=step,
        gen=gen,
        compensation=bool(flag(Headers.UNDO)),
        round=int(round_),
        bound=bound,
        first=bool(flag(Headers.FIRST)),
        known=flag(Headers.KNOWN),
        epoch=text(Headers.EPOCH),
        plan=plan,
    )


def _brief(value: Any) -> str:
    """A header value as a log line may show it: its type, and a bounded repr."""
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40]}{'...' if len(shown) > 40 else ''}"


def task_id(saga_id: str, step: str, undo: bool = False, round: int = 1) -> str:
    """Deterministic Celery task id, also the idempotency key the function sees.

    Duplicates of one message share it, and Flower finds it by saga id:
    ``<saga>:<step>``, ``<saga>:<step>:undo``, ``<saga>:<step>:undo:2``.
    """
    if not undo:
        return f"{saga_id}:{step}"
    return f"{saga_id}:{step}:undo" if round == 1 else f"{saga_id}:{step}:undo:{round}"


def parse_task_id(tid: str | None) -> tuple[str, str, int] | None:
    """(saga_id, step, round) of a saga task id, round 0 for the forward step; None for other ids.

    Step names hold no ":", saga ids may: a child saga's id is ``<parent_id>:<name>``.
    """
    parts = (tid or "").split(":")
    if len(parts) >= 4 and parts[-2] == "undo" and parts[-1].isdigit():
        return ":".join(parts[:-3]), parts[-3], int(parts[-1])
    if len(parts) >= 3 and parts[-1] == "undo":
        return ":".join(parts[:-2]), parts[-2], 1
    if len(parts) >= 2 and all(parts):
        return ":".join(parts[:-1]), parts[-1], 0
    return None


def message_serializer(app: Celery) -> str:
    """The serializer saga messages go out with: the app's ``task_serializer``.

    Raises:
        SagaDefinitionError: the app's workers would not accept it (it is not
            in ``accept_content``), so they would drop every saga message.
    """
    # Every message pays for this: read app.conf only when it changed.
    raw = raw_conf(app, _SERIALIZER_KEYS)
    cached = _CHECKED.get(app)
    if cached is not None and cached[0] == raw:
        return cached[1]
    conf = app.conf
    name, accepted = str(conf.task_serializer or "json"), tuple(conf.accept_content or ("json",))
    _check_serializer(name, accepted)
    _CHECKED[app] = (raw, name)
    return name


_SERIALIZER_KEYS = ("task_serializer", "accept_content")
_CHECKED: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def _check_serializer(name: str, accepted: tuple[str, ...]) -> None:
    content_type = registry.name_to_type.get(name)
    if content_type is None:
        raise SagaDefinitionError(
            f"app.conf.task_serializer is {name!r}, which kombu does not know: saga messages cannot be sent. "
            f"Set it to a registered serializer such as 'json'"
        )
    if content_type not in {registry.name_to_type.get(c, c) for c in accepted} and name not in accepted:
        raise SagaDefinitionError(
            f"saga messages go out with app.conf.task_serializer ({name!r}), which app.conf.accept_content "
            f"{list(accepted)} does not accept: workers would drop every saga message. Set task_serializer to "
            f"one of accept_content, or add {name!r} to accept_content"
        )


def queue_of(app: Celery, spec: StepSpec) -> str:
    """The queue ``spec``'s messages go to: its own routing, else the app's ``task_routes``, else the default."""
    route = app.amqp.router.route(dict(spec.options), spec.task, (), {})
    queue = route.get("queue")
    return str(getattr(queue, "name", queue) or app.conf.task_default_queue)


class StageNotPublished(Exception):
    """Publishing a stage stopped part-way (the broker failed); ``unpublished`` names the steps not sent.

    Its ``__cause__`` is the broker's error. A start catches it to release
    the saga; in a worker it reaches the log, and the record's deadlines or a
    redelivered copy (which re-publishes) take over.
    """

    def __init__(self, saga_id: str, unpublished: Sequence[str]) -> None:
        self.saga_id = saga_id
        self.unpublished = tuple(unpublished)
        super().__init__(f"saga {saga_id}: could not publish step(s) {', '.join(self.unpublished)}")


def publish_stage(
    app: Celery,
    saga_id: str,
    saga_name: str,
    gen: str,
    specs: Sequence[StepSpec],
    data: dict[str, Any],
    first: bool,
    redact: Collection[str] = (),
    epoch: str = "",
    countdown: float | None = None,
    plan: str = "",
    producer: Any = None,
) -> None:
    """Send the steps of one stage, in order; ``redact`` keys are masked where their arguments are shown.

    ``epoch`` is the store's: a receiver that finds no record tells a lost
    saga (the store was reset since) from an expired one by it. ``plan`` is
    the digest of the plan the steps come from: a receiver checks its task
    against that plan, and the plan against the record's.
    ``countdown`` delays them (a step sent again after its backoff).
    ``producer``: `celery_saga.enqueue`'s, which keeps the messages for the
    transition to push (no retry: what it cannot build is published after).

    Raises:
        StageNotPublished: a send failed; its cause is the broker's error.
    """
    # A wait is not published: the outside world delivers its event.
    specs = [spec for spec in specs if not spec.is_wait]
    if not specs:
        return
    # Every step gets the whole saga data (a participant filters on receipt),
    # so a key one step redacts is masked in every message of the saga.
    shown = _shown(data, redact)
    for k, spec in enumerate(specs):
        try:
            _publish_step(app, saga_id, saga_name, gen, spec, data, first, shown, epoch, countdown, plan, producer)
        except Exception as exc:
            raise StageNotPublished(saga_id, [s.name for s in specs[k:]]) from exc


def _shown(kwargs: dict[str, Any], redact: Collection[str]) -> dict[str, Any]:
    """The ``kwargsrepr`` option: how Flower, events and logs show a message's kwargs.

    ``redact`` keys are masked. Given here because Celery's own, ``saferepr``,
    costs about 120 µs for a few hundred bytes of kwargs, on every message:
    several percent of a saga's whole cost. Saga data is JSON, so the plain
    ``repr`` is safe, and about 30 times cheaper; cut at Celery's size limit.
    """
    shown = codec.masked(kwargs, redact) if redact else kwargs
    try:
        text = repr(shown)
    except Exception:  # a type registered with kombu's JSON may have any __repr__
        text = saferepr(shown, _REPR_MAXSIZE)
    if len(text) > _REPR_MAXSIZE:
        text = text[: _REPR_MAXSIZE - 3] + "..."
    return {"kwargsrepr": text}


# Celery's own limit for a message's argument repr.
_REPR_MAXSIZE = 1024


def _publish_step(
    app: Celery,
    saga_id: str,
    saga_name: str,
    gen: str,
    spec: StepSpec,
    data: dict[str, Any],
    first: bool,
    shown: dict[str, Any],
    epoch: str,
    countdown: float | None = None,
    plan: str = "",
    producer: Any = None,
) -> None:
    """Send one forward step as the user's own task, with the saga context in its headers."""
    options = {**spec.options, **shown}
    if producer is not None:
        options.update(producer=producer, retry=False)
    if countdown:
        options["countdown"] = countdown
    if spec.timeout is not None:
        # A worker drops the message once its deadline has passed (Celery
        # reports it revoked-expired, which the saga records as a timeout of
        # a step that never started); the record's deadline decides anyway.
        # A number is seconds from now for Celery, not an epoch time.
        options["expires"] = spec.timeout + (countdown or 0)
    with saga_trace(saga_id):
        app.send_task(
            spec.task,
            args=(),
            argsrepr="()",
            kwargs=data,
            task_id=task_id(saga_id, spec.name),
            root_id=saga_id,
            headers={
                Headers.ID: saga_id,
                Headers.NAME: saga_name,
                Headers.STEP: spec.name,
                Headers.GEN: gen,
                Headers.UNDO: 0,
                Headers.BOUND: spec.bound,
                Headers.FIRST: int(first),
                Headers.EPOCH: epoch,
                Headers.PLAN: plan,
            },
            # The saga record holds every result; a result-backend write per step
            # would only cost a round trip.
            ignore_result=True,
            serializer=message_serializer(app),
            **options,
        )


def publish_compensation(
    app: Celery,
    saga_id: str,
    raw: dict[str, str],
    plan: Plan,
    step: str,
    countdown: float | None = None,
    round: int = 1,
    epoch: str = "",
) -> None:
    """Send the compensation of ``step``, built from the raw record ``raw``.

    Round 1 carries the result the record has (None if the outcome is
    unknown); round 2 the late result of a step that was compensated blind.
    """
    spec = plan.step(step)
    assert spec.compensation is not None
    kwargs = data_before(plan, raw, spec.stage, codec.loads(raw["kwargs"]))
    kwargs.update(spec.bound)
    if round == 2:
        result_raw, known = raw.get(f"lr:{step}"), True
    else:
        known = raw.get(f"s:{step}") == StepStatus.COMPLETED.value
        result_raw = raw.get(f"r:{step}") if known else None
    kwargs["step_result"] = codec.loads(result_raw) if result_raw is not None else None
    options = {**spec.compensation_options, **_shown(kwargs, plan.redacted_keys)}
    with saga_trace(saga_id):
        app.send_task(
            spec.compensation,
            args=(),
            argsrepr="()",
            kwargs=kwargs,
            task_id=task_id(saga_id, step, undo=True, round=round),
            root_id=saga_id,
            countdown=countdown,
            headers={
                Headers.ID: saga_id,
                Headers.NAME: raw.get("name", ""),
                Headers.STEP: step,
                Headers.GEN: raw.get("gen", ""),
                Headers.UNDO: 1,
                Headers.ROUND: round,
                Headers.KNOWN: int(known),
                Headers.EPOCH: epoch,
                Headers.PLAN: raw.get("ph", ""),
            },
            ignore_result=True,
            serializer=message_serializer(app),
            **options,
        )


def send_callback(app: Celery, saga_id: str, which: str, sig_json: str, state: Callable[[], SagaState]) -> None:
    """Send on_complete / on_failure with the saga id first; its task id makes a resend a duplicate.

    A callback task of this app whose function takes ``status`` or ``data``
    (or ``**kwargs``) gets the saga's final status and data too, as steps get
    the saga data: filtered by its signature. ``state`` reads the saga.
    """
    sig = app.signature(codec.loads(sig_json))
    task = app.tasks.get(sig.task)
    extra: dict[str, Any] = {}
    params = params_of(task.run) if task is not None else None
    if params is not None and (params.takes_all or params.names & {"status", "data"}):
        final = state()
        extra = params.pick({"status": final.status.value, "data": final.data})
        shown = _shown({**(sig.kwargs or {}), **extra}, final.redact)
    else:
        shown = {}
    with saga_trace(saga_id):
        sig.apply_async(args=(saga_id,), kwargs=extra, task_id=f"{saga_id}:{which}", root_id=saga_id, **shown)


def resend(task: Task, request: Any, kwargs: dict[str, Any], countdown: float, exc: BaseException) -> Retry:
    """Send this very message again after ``countdown``, as a Celery retry of the same task id.

    For a message that could not even be checked against its record (the
    store is down). Not ``task.retry()``: it would count against the task's
    own max_retries, and Celery type-checks its kwargs, which for a step hold
    the whole saga data (the participant filters on receipt). The caller
    raises the returned Retry.
    """
    # Route it where this copy came from, as Celery's own retry does.
    delivery = request.delivery_info or {}
    exchange, routing_key = delivery.get("exchange"), delivery.get("routing_key")
    route: dict[str, Any] = {}
    if exchange == "" and routing_key:
        route["queue"] = routing_key
    elif routing_key:
        route.update(exchange=exchange, routing_key=routing_key)
    task.app.send_task(
        task.name,
        args=(),
        kwargs=kwargs,
        task_id=request.id,
        countdown=countdown,
        headers=dict(request.headers or {}),
        retries=int(request.retries or 0) + 1,
        # The copy shows what the original showed: its masked arguments, if any.
        argsrepr=getattr(request, "argsrepr", None),
        kwargsrepr=getattr(request, "kwargsrepr", None),
        root_id=request.root_id,
        parent_id=request.parent_id,
        ignore_result=True,
        serializer=message_serializer(task.app),
        **route,
    )
    return Retry(f"saga retry in {countdown:.2f}s", exc=exc, when=countdown)
