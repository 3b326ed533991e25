"""The fuzz test's machinery: saga shapes, a seeded generator of ops, and a driver that runs many in lockstep.

A `Run` drives one saga record with a sequence of ops drawn from its own
``random.Random(seed)``: begin, done, fail, lost, expire, sweep (with
deadlines moved into the past), cancel, comp_begin, comp_done, comp_fail,
signal, unwind, callback_sent, retry, purge, abort and a start again; with
the current, an old, ``*``, an empty and a wrong generation, the other
compensation round, wrong step names, Celery retry counts, redelivered
copies, and transition ids sent again. Most ops aim at what the record can
take in its status, so that sequences get past the first stage.

`drive` runs many in lockstep: each round sends one op of every run and
reads every record back in one pipelined round trip. The ops are the
store's own ``transitions.lua``, called as `RedisSagaStore` calls it on one
server (the record and its index shard as keys), and what a store and a
sweeper do around a call is done here too: a retry and a late outcome that
dispatches put the saga back in the deadline index, and a sweep is followed
by the sweeper's rescoring of the saga's deadline entry.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_saga import SagaStatus
from celery_saga.plan import Plan, StepSpec
from celery_saga.store import Op, Outcome, RedisSagaStore, StartRequest, Transition
from celery_saga.store.compact import unpack
from celery_saga.store.redis import transitions_source

LUA = transitions_source()
NAME = "fz"
FINISHED = {"COMPLETED", "COMPENSATED", "FAILED"}
STATUSES = [s.value for s in SagaStatus]
IN_FLIGHT = {"DISPATCHED", "RUNNING", "RETRYING"}


def _task(name: str, stage: int, undo: bool = True, cof: bool = False) -> StepSpec:
    compensation = f"t.undo_{name}" if undo else None
    return StepSpec(name, f"t.{name}", compensation, compensate_on_failure=cof, stage=stage, timeout=60.0)


def _wait(stage: int) -> StepSpec:
    return StepSpec("wait:ok", "", None, stage=stage, timeout=60.0, event="ok", reject="no")


@dataclass(frozen=True)
class Shape:
    """A saga definition under test: its plan, its pivot, and whether it is a child saga (it can be unwound)."""

    name: str
    plan: Plan
    pivot: str = ""
    child: bool = False

    def stage_of(self, m: str) -> int:
        return self.plan.step(m).stage

    def retriable(self, m: str) -> bool:
        return bool(self.pivot) and self.stage_of(m) > self.stage_of(self.pivot)

    @property
    def waits(self) -> bool:
        return any(s.is_wait for s in self.plan.steps)

    @property
    def tasks(self) -> list[str]:
        """The steps that are tasks (a wait gets no worker message)."""
        return [s.name for s in self.plan.steps if not s.is_wait]


SHAPES = (
    Shape("parallel", Plan(((_task("a", 0),), (_task("b", 1), _task("c", 1, undo=False))))),
    Shape("pivot-first", Plan(((_task("a", 0),), (_task("b", 1), _task("c", 1)))), pivot="a"),
    Shape("pivot-between", Plan(((_task("a", 0),), (_task("p", 1),), (_task("c", 2),))), pivot="p"),
    Shape("wait", Plan(((_task("a", 0),), (_wait(1),), (_task("c", 2, undo=False),)))),
    Shape("wait-past-pivot", Plan(((_task("p", 0),), (_wait(1), _task("c", 1)))), pivot="p"),
    Shape(
        "child-of-four",
        Plan(((_task("a", 0), _task("b", 0, cof=True)), (_task("c", 1),), (_task("d", 2, undo=False),))),
        child=True,
    ),
)


@dataclass(frozen=True)
class Options:
    """The settings a run starts its saga with."""

    maxr: int | None  # compensation max retries
    fmaxr: int | None  # forward max retries (a saga with a pivot)
    callbacks: bool  # on_complete / on_failure signatures


def start_request(shape: Shape, options: Options, saga_id: str, gen: str, kwargs: dict[str, Any]) -> StartRequest:
    """The request `Saga.apply_async` would make: its step fields as `Saga._definition` writes them."""
    fields: list[tuple[str, str]] = []
    for s in shape.plan.steps:
        if s.compensation and not shape.retriable(s.name):
            fields.append((f"comp:{s.name}", s.compensation))
        if s.compensate_on_failure:
            fields.append((f"cof:{s.name}", "1"))
        if s.timeout is not None:
            fields.append((f"to:{s.name}", f"{s.timeout * 1000:.0f}"))
        if s.reject:
            fields.append((f"rj:{s.name}", s.reject))
    kwargs_json = json.dumps(kwargs)
    settings = {
        "compensation_retry_backoff": 0.0,
        "compensation_retry_backoff_max": 0.0,
        "forward_retry_backoff": 0.0,
        "forward_retry_backoff_max": 0.0,
        "forward_max_retries": options.fmaxr,
    }
    return StartRequest(
        saga_id=saga_id,
        gen=gen,
        name=NAME,
        fingerprint=kwargs_json,
        kwargs_json=kwargs_json,
        plan_json=shape.plan.to_json(),
        plan_digest=shape.plan.digest(),
        stages=shape.plan.lua_stages(),
        retention=60.0,
        settings_json=json.dumps(settings),
        on_complete='{"task": "t.on_complete"}' if options.callbacks else "",
        on_failure='{"task": "t.on_failure"}' if options.callbacks else "",
        idempotency_key="",
        max_retries=options.maxr,
        step_fields=tuple(fields),
        watch_at=time.time() + 60.0,
        pivot=shape.pivot,
        parent=("parent", "g0", "sub") if shape.child else None,
    )


@dataclass(frozen=True)
class Action:
    """One op of a sequence, exactly as sent; ``past`` are deadline fields set into the past just before it."""

    op: Op
    args: tuple[str, ...] = ()
    gen: str = ""
    tx: str = ""
    past: tuple[str, ...] = ()
    replay_of: int | None = None  # the op (#, from 1) whose transition id and arguments this sends again

    def __str__(self) -> str:
        if self.op is Op.START:
            return f"start: store.start(gen={self.args[0]!r}{', other kwargs' if len(self.args) > 1 else ''})"
        text = f"{self.op.value}({', '.join(repr(a) for a in self.args)}) gen={self.gen!r} tx={self.tx!r}"
        if self.past:
            text = f"[past {', '.join(self.past)}] {text}"
        if self.replay_of is not None:
            text += f"  (replay of #{self.replay_of})"
        return text


@dataclass
class Seen:
    """The record after an op (unpacked; None if there is none) and the indexes that hold the saga."""

    rec: dict[str, str] | None
    indexed: set[str]
    watched: float | None  # its score in the deadline index
    packed: bool = False  # a finished record, kept compact


@dataclass
class Run:
    """One saga driven by one seeded sequence of ops, with everything needed to replay or explain it."""

    seed: int
    store: RedisSagaStore
    rng: random.Random = field(init=False)
    shape: Shape = field(init=False)
    options: Options = field(init=False)
    saga_id: str = field(init=False)
    length: int = field(init=False)
    gens: list[str] = field(default_factory=lambda: ["g1"])
    log: list[tuple[Action, str]] = field(default_factory=list)
    seen: Seen = field(default_factory=lambda: Seen(None, set(), None))
    #: Steps that failed as child sagas whose compensations gave up (fail, ARGV 7 = "1").
    child_failed: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        rng = self.rng = random.Random(self.seed)
        self.shape = rng.choice(SHAPES)
        self.options = Options(rng.choice([None, 0, 1, 3]), rng.choice([None, 0, 1]), rng.random() < 0.5)
        self.saga_id = f"fz{self.seed}"
        self.length = rng.randint(5, 25)

    # -- keys -------------------------------------------------------------------

    @property
    def record_key(self) -> str:
        return self.store.keys.record(self.saga_id)

    @property
    def due_key(self) -> str:
        return self.store.keys.due(self.store.keys.shard_of(self.saga_id))

    def index_key(self, status: str) -> str:
        return self.store.keys.name_index(self.store.keys.shard_of(self.saga_id), NAME, status)

    # -- the generator ------------------------------------------------------------

    def start(self, gen: str, other_kwargs: bool = False) -> Transition:
        kwargs = {"order": 2 if other_kwargs else 1}
        return self.store.start(start_request(self.shape, self.options, self.saga_id, gen, kwargs))

    def next_action(self) -> Action:
        rng, rec = self.rng, self.seen.rec
        n = len(self.log) + 1
        if n == 1:
            return Action(Op.START, (self.gens[0],))
        replayable = [i for i, (a, _) in enumerate(self.log, 1) if a.tx and a.replay_of is None]
        if replayable and rng.random() < 0.1:
            # A transition sent again (redis-py retries a timed-out call): mostly the latest one.
            j = replayable[-1] if rng.random() < 0.7 else rng.choice(replayable)
            first = self.log[j - 1][0]
            return Action(first.op, first.args, first.gen, first.tx, replay_of=j)
        if rec is None:
            if rng.random() < 0.7:
                self.gens.append(f"g{len(self.gens) + 1}")
                return Action(Op.START, (self.gens[-1],))
            rec = {}
        phase = _PHASE.get(rec.get("status", ""), 3)
        weights = [w[phase] * (1 if op is not Op.SIGNAL or self.shape.waits else 0.2) for op, w in _WEIGHTS.items()]
        op = rng.choices(list(_WEIGHTS), weights)[0]
        return self._action(op, rec, f"t{n}" if rng.random() < 0.95 else "")

    def _gen(self, rec: dict[str, str], operator: bool = False) -> str:
        current = rec.get("gen") or self.gens[-1]
        r = self.rng.random()
        if operator:
            return "*" if r < 0.85 else current if r < 0.92 else self.rng.choice(["g0", "", "gX"])
        if r < 0.85:
            return current
        old = [g for g in self.gens if g != current] or ["g0"]
        return self.rng.choice(["*", "", "gX", *old])

    def _step(self, candidates: list[str]) -> str:
        r = self.rng.random()
        if candidates and r < 0.8:
            return self.rng.choice(candidates)
        return self.rng.choice(self.shape.tasks) if r < 0.96 else "zzz"

    def _forward(self, rec: dict[str, str], *statuses: str) -> list[str]:
        return [m for m in self.shape.tasks if rec.get(f"s:{m}") in statuses]

    def _comp(self, rec: dict[str, str], *statuses: str) -> tuple[str, str]:
        found = [
            (m, r) for m in self.shape.tasks for r, f in (("1", "cs:"), ("2", "cs2:")) if rec.get(f + m) in statuses
        ]
        m, r = self.rng.choice(found) if found and self.rng.random() < 0.85 else (self._step([]), "1")
        return m, r if self.rng.random() < 0.85 else {"1": "2", "2": "1"}[r]

    def _past(self, rec: dict[str, str], own: str | None, chance: float) -> tuple[str, ...]:
        """Deadline fields to move into the past (the store clock is Redis TIME): never in a packed record."""
        if self.seen.packed or not rec or self.rng.random() >= chance:
            return ()
        names = [s.name for s in self.shape.plan.steps]
        fields = [f"dl:{m}" for m in names if rec.get(f"s:{m}") in ("DISPATCHED", "RUNNING")]
        fields += [f"cdl{r}:{m}" for m in self.shape.tasks for r in ("", "2") if rec.get(f"cs{r}:{m}") in IN_FLIGHT]
        if rec.get("status") in ("PENDING", "RUNNING") and rec.get("past") != "1":
            fields.append("sdl")  # the saga timeout
        if own is not None and f"dl:{own}" in fields and self.rng.random() < 0.7:
            return (f"dl:{own}",)
        return tuple(self.rng.sample(fields, min(len(fields), self.rng.randint(1, 2))))

    def _action(self, op: Op, rec: dict[str, str], tx: str) -> Action:
        rng = self.rng
        u = repr(rng.random())  # the jitter of a backoff the op may draw (SagaStore.apply adds it)
        retries = rng.choice(["0", "0", "0", "1", "2"])
        redelivered = "1" if rng.random() < 0.15 else ""
        if op is Op.BEGIN:
            m = self._step(self._forward(rec, "DISPATCHED", "RUNNING"))
            return Action(op, (m, retries, redelivered), self._gen(rec), tx, self._past(rec, m, 0.1))
        if op is Op.DONE:
            m = self._step(self._forward(rec, "RUNNING", "RUNNING", "DISPATCHED", "UNKNOWN", "CANCELLED"))
            return Action(op, (m, rng.choice(["null", '{"k": 1}', f'{{"{m}": "{m}"}}'])), self._gen(rec), tx)
        if op in (Op.FAIL, Op.LOST):
            m = self._step(self._forward(rec, "RUNNING", "RUNNING", "DISPATCHED", "UNKNOWN"))
            if op is Op.LOST:
                return Action(op, (m, "WorkerLostError", rng.choice(["lost", "timeout"]), u), self._gen(rec), tx)
            child = ("1",) if rng.random() < 0.1 else ()  # a child saga that ended FAILED
            return Action(op, (m, "RuntimeError: no", u, *child), self._gen(rec), tx)
        if op is Op.EXPIRE:
            m = self._step(self._forward(rec, "DISPATCHED"))
            return Action(op, (m,), self._gen(rec), tx, self._past(rec, m, 0.6))
        if op is Op.SWEEP:
            return Action(op, (rng.choice(["10000", "0"]), u), self._gen(rec, True), tx, self._past(rec, None, 0.4))
        if op is Op.COMP_BEGIN:
            m, r = self._comp(rec, "DISPATCHED", "RUNNING", "RETRYING")
            return Action(op, (m, retries, redelivered, r), self._gen(rec), tx)
        if op is Op.COMP_DONE:
            m, r = self._comp(rec, "RUNNING", "RUNNING", "RETRYING", "DISPATCHED")
            return Action(op, (m, r), self._gen(rec), tx)
        if op is Op.COMP_FAIL:
            m, r = self._comp(rec, "RUNNING", "RUNNING", "DISPATCHED")
            give_up = ("1",) if rng.random() < 0.05 else ()
            return Action(op, (m, "RuntimeError: refund down", r, u, *give_up), self._gen(rec), tx)
        if op is Op.SIGNAL:
            event = rng.choice(["ok", "ok", "no", "zzz"])
            return Action(op, (event, rng.choice(["null", '{"by": "ann"}'])), self._gen(rec, True), tx)
        if op is Op.ABORT:
            first = [s.name for s in self.shape.plan.stages[0]]
            unpublished = rng.sample(first, rng.randint(1, len(first)))
            return Action(op, ("publish failed: boom", *unpublished), self._gen(rec), tx)
        if op is Op.START:
            if rng.random() < 0.5:
                return Action(op, (rec.get("gen") or self.gens[-1],))  # the same start again
            self.gens.append(f"g{len(self.gens) + 1}")
            return Action(op, (self.gens[-1], "other kwargs") if rng.random() < 0.2 else (self.gens[-1],))
        if op is Op.PURGE:
            return Action(op, (), self._gen(rec, True), "")
        error = {Op.CANCEL: ("cancelled",), Op.UNWIND: ("parent rolls back",)}.get(op, ())
        return Action(op, error, self._gen(rec, True), tx)


# How often each op is drawn while the saga goes forward (PENDING, RUNNING),
# rolls back (COMPENSATING), has ended (COMPLETED, COMPENSATED, FAILED), or
# has no record: mostly what moves it on from there, sometimes anything.
_WEIGHTS = {
    Op.BEGIN: (14, 2, 2, 1),
    Op.DONE: (16, 5, 4, 1),
    Op.FAIL: (3, 2, 2, 1),
    Op.LOST: (2, 2, 2, 1),
    Op.EXPIRE: (2, 2, 1, 1),
    Op.SWEEP: (3, 5, 3, 1),
    Op.CANCEL: (1.5, 1, 1, 1),
    Op.COMP_BEGIN: (1, 12, 3, 1),
    Op.COMP_DONE: (1, 12, 3, 1),
    Op.COMP_FAIL: (0.5, 6, 2, 1),
    Op.SIGNAL: (3, 1, 1, 1),
    Op.UNWIND: (0.5, 0.5, 2, 1),
    Op.CALLBACK_SENT: (0.3, 0.3, 1.5, 1),
    Op.RETRY: (0.5, 0.5, 3, 1),
    Op.PURGE: (0.3, 0.3, 1, 1),
    Op.ABORT: (1, 0.3, 0.3, 1),
    Op.START: (0.5, 0.3, 0.5, 1),
}
_PHASE = {"PENDING": 0, "RUNNING": 0, "COMPENSATING": 1, "COMPLETED": 2, "COMPENSATED": 2, "FAILED": 2}


# -- reading back -------------------------------------------------------------------

# The record (HGETALL) and the saga's score in each status index and in the
# deadline index, as one JSON text: parsing one string per op, not a reply
# of a hundred items, keeps a run within its time on a busy machine.
# KEYS: the record, the status indexes (STATUSES order), the deadline index. ARGV: the saga id.
_READ_LUA = """
local out = {redis.call('HGETALL', KEYS[1])}
for i = 2, #KEYS do out[i] = redis.call('ZSCORE', KEYS[i], ARGV[1]) or '' end
return cjson.encode(out)
"""


def queue_read(pipe: Any, run: Run, sha: str) -> None:
    keys = [run.record_key, *(run.index_key(status) for status in STATUSES), run.due_key]
    pipe.evalsha(sha, len(keys), *keys, run.saga_id)


def seen_from(reply: str) -> Seen:
    flat, *scores = json.loads(reply)
    raw = dict(zip(flat[::2], flat[1::2], strict=True)) if isinstance(flat, list) else {}  # cjson: {} for none
    indexed = {status for status, score in zip(STATUSES, scores[:-1], strict=True) if score != ""}
    watched = float(scores[-1]) if scores[-1] != "" else None
    return Seen(unpack(raw) if raw else None, indexed, watched, "zn" in raw)


# -- driving runs in lockstep -------------------------------------------------------


def _queue_op(pipe: Any, run: Run, action: Action, sha: str) -> int:
    """Queue the op as `SagaStore.apply` sends it on one server; the number of commands queued, the op's last."""
    for f in action.past:
        pipe.hset(run.record_key, f, "1")
    queued = len(action.past) + 1
    if action.op in (Op.RETRY, Op.UNWIND):
        # SagaStore.retry / unwind: the saga goes back in the deadline index first, for the new attempts' deadlines.
        pipe.zadd(run.due_key, {run.saga_id: time.time() * 1000}, lt=True)
        queued += 1
    shard = run.store.keys.shard_base(run.store.keys.shard_of(run.saga_id))
    keys, args = [run.record_key, shard], [action.op.value, action.tx, action.gen, *action.args]
    if sha:
        pipe.evalsha(sha, len(keys), *keys, *args)
    else:  # (the store's own function library, which it loaded: see RedisSagaStore._invoke)
        pipe.execute_command("FCALL", run.store._function, len(keys), *keys, *args)
    return queued


def _after_call(run: Run, action: Action, before: Seen, t: Transition) -> bool:
    """What a store and a sweeper do after the call; True if it touched the deadline index."""
    if t.outcome is Outcome.LATE and t.due:
        # SagaStore.apply: a second round needs its deadlines watched.
        run.store.client.zadd(run.due_key, {run.saga_id: time.time() * 1000}, lt=True)
        return True
    if action.op is Op.SWEEP and before.watched is not None and t.outcome is Outcome.SWEPT:
        # The sweeper that claimed the entry settles it with the record's next deadline.
        run.store.rescore(run.saga_id, repr(before.watched), "" if t.next_deadline is None else str(t.next_deadline))
        return True
    return False


#: The invariants: what ``action`` broke, given the record and indexes before and after it, and its reply.
Check = Callable[["Run", "Action", "Seen", "Seen", Transition], list[str]]


def drive(store: RedisSagaStore, seeds: list[int], check: Check) -> str | None:
    """Run a sequence from each seed, in lockstep; a report of the first that breaks an invariant, or None."""
    # As the store calls them: its function library where the server takes one (Redis 7+), else by EVALSHA.
    transitions = "" if store._use_functions() else store.client.script_load(LUA)
    read = store.client.script_load(_READ_LUA)
    active = [Run(seed, store) for seed in seeds]
    while active:
        failure = _round(store, active, transitions, read, check)
        if failure is not None:
            return failure
        active = [run for run in active if len(run.log) <= run.length]
    return None


def _round(store: RedisSagaStore, runs: list[Run], transitions: str, read: str, check: Check) -> str | None:
    """An op of every run, and every record read back after it, in one round trip; then the checks."""
    pipe = store.client.pipeline(transaction=False)
    sent: list[tuple[Run, Action, Transition | None, int]] = []
    queued = 0
    for run in runs:
        action, started = run.next_action(), None
        if action.op is Op.START:
            started = run.start(action.args[0], other_kwargs=len(action.args) > 1)
        else:
            queued += _queue_op(pipe, run, action, transitions)
        queue_read(pipe, run, read)
        queued += 1
        sent.append((run, action, started, queued - 1))  # the op's reply, if sent here, comes just before
    replies = pipe.execute(raise_on_error=False)
    applied: list[tuple[Run, Action, Transition, Seen]] = []
    for run, action, started, at in sent:
        t = started
        if t is None:
            if isinstance(replies[at - 1], Exception):
                return report(run, [f"the script failed: {replies[at - 1]}"], action)
            t = Transition.from_reply(action.op, run.saga_id, str(replies[at - 1]), NAME, action.gen)
        applied.append((run, action, t, seen_from(replies[at])))
    # What the store and a sweeper do after some calls moves the deadline entry: read it again.
    rewatched = [(run, after) for run, action, t, after in applied if _after_call(run, action, run.seen, t)]
    if rewatched:
        pipe = store.client.pipeline(transaction=False)
        for run, _ in rewatched:
            pipe.zscore(run.due_key, run.saga_id)
        for (_, after), score in zip(rewatched, pipe.execute(), strict=True):
            after.watched = score
    for run, action, t, after in applied:
        failure = _settle(run, action, t, after, check)
        if failure is not None:
            return failure
    return None


def _settle(run: Run, action: Action, t: Transition, after: Seen, check: Check) -> str | None:
    """Check the invariants after ``action`` and log it; a report if any is broken."""
    found = check(run, action, run.seen, after, t)
    run.seen = after
    run.log.append((action, f"{t.outcome.value}, {t.status}"))
    if (after.rec or {}).get("status") in FINISHED and run.rng.random() < 0.2:
        run.length = len(run.log) - 1  # an ended saga gets a few more ops (late outcomes, operators), not many
    return report(run, found) if found else None


def report(run: Run, found: list[str], pending: Action | None = None) -> str:
    """What broke, and every op of the sequence, to replay it by hand or with its seed."""
    lines = [f"fuzz sequence {run.seed} (shape {run.shape.name}, {run.options}) broke an invariant:"]
    lines += [f"  - {v}" for v in found]
    lines.append(
        f"  replay it alone: SAGA_FUZZ_SEED={run.seed} SAGA_FUZZ=1 .venv/bin/python -m pytest tests/test_fuzz.py"
    )
    lines.append("  ops (-> outcome, status after):")
    lines += [f"    #{i} {action} -> {said}" for i, (action, said) in enumerate(run.log, 1)]
    if pending is not None:
        lines.append(f"    #{len(run.log) + 1} {pending} -> (no reply)")
    rec = run.seen.rec or {}
    lines.append("  record after the last op: " + json.dumps(dict(sorted(rec.items())))[:4000])
    return "\n".join(lines)
