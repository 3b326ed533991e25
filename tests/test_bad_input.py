"""Bad input gets a clear error and leaves nothing behind (issue 20, item 4).

Data nested deeper than ``saga_max_data_depth``, keys that JSON would merge,
and text that is no UTF-8 are refused where they come in: at start (with
nothing written or published), from a step (an unknown outcome, compensated
blind), and on the command line.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDataError,
    SagaDefinitionError,
    SagaStatus,
    StepStatus,
    current_step,
    saga_step,
)
from celery_saga.stores import settings_of
from tests import cli_app, proc_app, shop
from tests.helpers import finished, patience, saga_keys
from tests.proc_app import deep_value
from tests.subprocs import Procs, proc_env, running
from tests.test_cli import cli_many


def nothing_written(r: redis.Redis, prefix: str, app: Celery) -> bool:
    """No saga record, index entry or definition, and no message on the app's queue."""
    return saga_keys(r, prefix) == [] and r.llen(app.conf.task_default_queue) == 0


# -- at start ------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["dict", "list"])
def test_data_nested_too_deep_is_refused_at_start_and_again_with_the_same_key(
    app: Celery, r: redis.Redis, prefix: str, container: str
) -> None:
    s = shop.build(app, r, prefix)
    # Given data nested 495 levels deep: before, the record was written and the
    # first step published (killing a prefork worker's main process), or, from
    # deeper in a caller's stack, publishing raised RecursionError and left the
    # record PENDING, and a retry with the same key raised it again.
    deep: Any = deep_value(495) if container == "dict" else json.loads("[" * 495 + "]" * 495)
    for _ in range(2):  # the caller retries with the same idempotency key
        with pytest.raises(SagaDataError) as info:
            s.sequential.apply_async(kwargs={"order_id": 1, "items": deep}, idempotency_key="order-1")
        assert f"items is of type {container} nested deeper than 64 levels (saga_max_data_depth)" in str(info.value)
        assert nothing_written(r, prefix, app)


def test_the_depth_limit_is_a_setting_and_its_bound_is_exact(app: Celery, r: redis.Redis, prefix: str) -> None:
    app.conf.saga_max_data_depth = 3
    s = shop.build(app, r, prefix)
    # The data itself is level 1: {"x": {"y": {}}} is 3 levels deep.
    with pytest.raises(SagaDataError, match=r"x is of type dict nested deeper than 3 levels"):
        s.sequential.delay(order_id=1, x={"y": {"z": {}}})
    assert nothing_written(r, prefix, app)
    assert s.sequential.delay(order_id=1, x={"y": {}}).status is SagaStatus.PENDING
    for bad in (0, 201, True, "64", 2.5):
        app.conf.saga_max_data_depth = bad
        with pytest.raises(SagaDefinitionError, match="saga_max_data_depth must be an int from 1 to 200"):
            settings_of(app)


def test_keys_that_json_would_merge_are_refused(app: Celery, r: redis.Redis, prefix: str) -> None:
    s = shop.build(app, r, prefix)
    merged = [
        ({1: "a", "1": "b"}, "1 and '1'"),
        ({True: 1, "true": 2}, "True and 'true'"),
        ({None: 1, "null": 2}, "None and 'null'"),
    ]
    for value, keys in merged:
        # Before: started, with one of the two silently lost (or a raw TypeError with a key).
        for key in (None, "order-7"):
            with pytest.raises(SagaDataError, match=f"order.lines is of type dict with the keys {keys}"):
                s.sequential.apply_async(kwargs={"order_id": 7, "order": {"lines": value}}, idempotency_key=key)
    assert nothing_written(r, prefix, app)
    # Keys of several types that stay distinct are stored, as strings, with an idempotency key too
    # (sorting them for its fingerprint raised a raw TypeError before).
    first = s.sequential.apply_async(kwargs={"order_id": 7, "lines": {1: "a", "b": 2}}, idempotency_key="mixed")
    again = s.sequential.apply_async(kwargs={"order_id": 7, "lines": {"1": "a", "b": 2}}, idempotency_key="mixed")
    assert again.id == first.id and first.state().kwargs["lines"] == {"1": "a", "b": 2}


def test_text_that_is_no_utf8_is_refused_by_name(app: Celery, r: redis.Redis, prefix: str) -> None:
    s = shop.build(app, r, prefix)
    # Before: a raw UnicodeEncodeError for the key, and the data was started with.
    with pytest.raises(SagaDataError, match=r"idempotency_key '\\ud800' has a lone surrogate"):
        s.sequential.apply_async(kwargs={"order_id": 1}, idempotency_key="\ud800")
    with pytest.raises(SagaDataError, match=r"customer.name is of type str with a lone surrogate '\\ud800'"):
        s.sequential.delay(order_id=1, customer={"name": "Zo\ud800"})
    with pytest.raises(SagaDataError, match=r"tags\[1\] is of type str with a lone surrogate '\\udc00'"):
        s.sequential.delay(order_id=1, tags=["ok", "\udc00"])
    with pytest.raises(SagaDataError, match=r"\['\\udfff'\] is of type str \(as a key\) with a lone surrogate"):
        s.sequential.delay(order_id=1, **{"\udfff": 1})
    assert nothing_written(r, prefix, app)
    with pytest.raises(SagaDefinitionError, match=r"saga name 'order\\ud800' has a lone surrogate"):
        Saga("order\ud800", [s.validate])
    # Text that is UTF-8, however far from ASCII, is data like any other.
    assert s.sequential.delay(order_id=1, customer={"name": "Zoë 🛒"}).status is SagaStatus.PENDING


# -- what a step returns -------------------------------------------------------------------


@pytest.fixture
def returns(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    """A saga whose first step returns ``value`` from its data (decoded from ``spec``), then a second step."""
    undone = f"{prefix}:undone"

    @app.task(shared=False, name="bad.undo")
    def undo(step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None
        r.rpush(undone, json.dumps([ctx.step, ctx.result_known, step_result]))

    @saga_step(compensate=undo)
    @app.task(shared=False, name="bad.give")
    def give(spec: str) -> Any:
        if spec == "deep":
            return {"blob": deep_value(100)}
        if spec == "merged":
            return {"m": {2: "x", "2": "y"}}
        return {"name": "\ud800"}

    @saga_step(compensate=None)
    @app.task(shared=False, name="bad.next")
    def next_(spec: str) -> None:
        r.rpush(f"{prefix}:ran", "bad.next")

    saga = Saga("bad_returns", [give, next_])
    return SimpleNamespace(saga=saga, undone=lambda: [json.loads(x) for x in r.lrange(undone, 0, -1)])


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("deep", "result.blob is of type dict nested deeper than 64 levels"),
        ("merged", "result.m is of type dict with the keys 2 and '2'"),
        ("surrogate", r"result.name is of type str with a lone surrogate '\ud800'"),
    ],
)
def test_a_result_the_record_cannot_hold_is_an_unknown_outcome_compensated_blind(
    returns: SimpleNamespace, worker: Any, r: redis.Redis, prefix: str, spec: str, why: str
) -> None:
    # Given a step that returns it (before: the deep and the merged ones were
    # stored, and the saga completed; the deep one went on in every later message)
    with worker():
        res = returns.saga.delay(spec=spec)
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(20))
    # Then its outcome is unknown, it is compensated blind, and the next step never ran
    assert info.value.reason == "failure" and why in (info.value.error or "")
    step = res.state().step("bad.give")
    assert step.status is StepStatus.UNKNOWN and step.stopped_by == "unstorable"
    assert returns.undone() == [["bad.give", False, None]]
    assert r.llen(f"{prefix}:ran") == 0


# -- a prefork worker ----------------------------------------------------------------------


@pytest.fixture
def procs(redis_url: str, ns: str, tmp_path: Path) -> Iterator[tuple[SimpleNamespace, Procs, SimpleNamespace]]:
    """The test's env, its subprocesses (killed on the way out), and its side of tests/proc_app.py."""
    env = proc_env(redis_url, f"sagabad-{ns}", f"q-bad-{ns}")
    s = proc_app.create(env.redis_url, env.prefix, env.queue)
    try:
        with running(Procs(tmp_path, env, ns)) as p:
            yield env, p, s
    finally:
        s.app.close()
        with contextlib.closing(s.client), contextlib.closing(s.gate_client):
            for key in s.client.scan_iter(match=f"{env.prefix}:*", count=500):
                s.client.unlink(key)


def test_a_result_too_deep_to_pickle_never_reaches_a_prefork_worker(
    procs: tuple[SimpleNamespace, Procs, SimpleNamespace],
) -> None:
    _, p, s = procs
    # Given a prefork worker, and a first step that returns data nested 480 levels
    # deep. Before, it was stored and the next step's message carried it: the
    # worker's main process, pickling it for its pool, died of RecursionError,
    # and the redelivered message killed the restarted worker again.
    worker = p.worker()
    res = s.sequential.delay(order_id=1, deep_result=480)
    # Then the saga ends with a clear error, its first step compensated blind
    assert finished(res, timeout=20) is SagaStatus.COMPENSATED, p.logs()
    state = res.state()
    assert "result.blob is of type dict nested deeper than 64 levels" in (state.error or "")
    assert state.step("proc.one").status is StepStatus.UNKNOWN
    assert [e for e in s.entries("ledger") if e[0] == "undo"] == [["undo", "proc.one", None]]
    # ... and the worker lives on, running the next saga
    assert s.sequential.delay(order_id=2).get(timeout=patience(20))["tracking"] == "t-2-p-2-r-2"
    assert worker.poll() is None, p.logs()
    assert "RecursionError" not in p.logs()


# -- the command line ----------------------------------------------------------------------


@pytest.fixture
def idle(redis_url: str, ns: str) -> Iterator[SimpleNamespace]:
    with cli_app.idle(redis_url, f"sagabad-{ns}") as w:
        yield w


def test_a_since_out_of_range_is_a_usage_error(idle: SimpleNamespace) -> None:
    # Before: a traceback (OverflowError) for each.
    far = ("99999999999d", "9" * 400 + "s", "999999999d")
    *refused, fine = cli_many(idle.env, [["list", "--since", since] for since in (*far, "1000w")])
    for proc in refused:  # cli_many asserts that no run printed a traceback
        assert proc.returncode == 2, proc.stderr
        assert "Invalid value for '--since'" in proc.stderr and "is too far back" in proc.stderr
    assert fine.returncode == 0, fine.stderr
