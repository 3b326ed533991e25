"""The ``celery_saga.testing`` plugin, used the way users use it: on one module-level app shared by every test."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, bootsteps
from celery.worker import state as worker_state

from celery_saga import Saga, SagaStatus, StepStatus, current_step, saga_step, step
from celery_saga.testing import (
    SagaFaults,
    app_queues,
    assert_compensated,
    assert_completed,
    assert_failed,
    configured,
    isolated_settings,
    thread_worker,
)
from tests.helpers import patience

pytest_plugins = ["pytester", "celery_saga.testing"]

# No broker and no saga store: the plugin's fixtures provide both, per test.
app = Celery("plugin_test", set_as_current=False)


def log(action: str) -> None:
    ctx = current_step()
    assert ctx is not None
    # The app's settings during a test are the test's own, so the ledger is too.
    with redis.Redis.from_url(app.conf.saga_redis_url) as client:
        client.rpush(f"{app.conf.saga_key_prefix}:ledger", f"{action}:{ctx.step}")


@app.task(shared=False, name="plug.undo")
def undo(order_id: int, step_result: Any = None) -> None:
    log("undo")


@saga_step(compensate=undo)
@app.task(shared=False, name="plug.reserve")
def reserve(order_id: int) -> dict[str, Any]:
    log("do")
    return {"reservation": f"r-{order_id}"}


@saga_step(compensate=undo)
@app.task(shared=False, name="plug.charge")
def charge(order_id: int, reservation: str) -> dict[str, Any]:
    log("do")
    return {"payment": f"p-{order_id}"}


@saga_step(compensate=undo)
@app.task(shared=False, name="plug.ship")
def ship(order_id: int) -> dict[str, Any]:
    log("do")
    return {"tracking": f"t-{order_id}"}


@saga_step(compensate=None)
@app.task(shared=False, name="plug.flaky", autoretry_for=(RuntimeError,), max_retries=1, default_retry_delay=0)
def flaky() -> dict[str, int]:
    return {"ok": 1}


@app.task(shared=False, name="plug.after")
def after(saga_id: str) -> None:
    # An end callback held at a gate the test opens; it then writes the ledger.
    # (A socket timeout above the gate's: redis-py 8's default, 5 s, would end the wait.)
    with redis.Redis.from_url(app.conf.saga_redis_url, socket_timeout=90) as client:
        client.blpop([f"{app.conf.saga_key_prefix}:after-gate"], timeout=60)
        client.rpush(f"{app.conf.saga_key_prefix}:ledger", f"callback:{saga_id}")


order = Saga("plug_order", [reserve, charge, ship])
flaky_saga = Saga("plug_flaky", [flaky])
deposit = Saga("plug_deposit", [reserve, charge])


@pytest.fixture
def saga_app() -> Celery:
    return app


@pytest.fixture
def ledger(saga_test_app: Celery) -> Iterator[Callable[[], list[str]]]:
    client = redis.Redis.from_url(saga_test_app.conf.saga_redis_url, decode_responses=True)
    key = f"{saga_test_app.conf.saga_key_prefix}:ledger"
    yield lambda: list(client.lrange(key, 0, -1))
    client.close()


def test_assert_completed_returns_the_final_state(saga_worker: Any, ledger: Callable[[], list[str]]) -> None:
    state = assert_completed(order.delay(order_id=1))

    assert state.data == {"order_id": 1, "reservation": "r-1", "payment": "p-1", "tracking": "t-1"}
    assert ledger() == ["do:plug.reserve", "do:plug.charge", "do:plug.ship"]


def test_assert_completed_waits_for_the_on_complete_callback_to_have_run(
    saga_worker: Any, saga_test_app: Celery, ledger: Callable[[], list[str]]
) -> None:
    # Given a completed saga whose on_complete callback is held at a gate
    res = order.apply_async(kwargs={"order_id": 9}, on_complete=after.s())
    # Then assert_completed does not return while the callback has not run
    with pytest.raises(AssertionError, match="on_complete callback has not run"):
        assert_completed(res, timeout=patience(3))
    assert res.status is SagaStatus.COMPLETED and f"callback:{res.id}" not in ledger()
    # And once the callback runs, it returns, with what the callback wrote already there
    with redis.Redis.from_url(saga_test_app.conf.saga_redis_url) as client:
        client.rpush(f"{saga_test_app.conf.saga_key_prefix}:after-gate", 1)
    assert_completed(res, timeout=patience(30))
    assert ledger()[-1] == f"callback:{res.id}"
    # callbacks=False does not wait for it
    assert assert_completed(res, callbacks=False).status is SagaStatus.COMPLETED


def test_fail_makes_a_step_fail(saga_worker: Any, saga_faults: SagaFaults, ledger: Callable[[], list[str]]) -> None:
    saga_faults.fail("plug.charge", ValueError("card declined"))

    state = assert_compensated(order.delay(order_id=2), steps=["plug.reserve"], failed_step="plug.charge")

    assert state.error == "ValueError: card declined"
    assert ledger() == ["do:plug.reserve", "undo:plug.reserve"]
    assert saga_faults.fired("plug.charge") == 1


def test_fail_times_and_saga_limit_a_fault(saga_worker: Any, saga_faults: SagaFaults) -> None:
    # Given charge fails once, and only in the deposit saga
    saga_faults.fail("plug.charge", times=1, saga="plug_deposit")

    # Then an order is untouched, the first deposit fails and the second one does not
    assert_completed(order.delay(order_id=3))
    state = assert_compensated(deposit.delay(order_id=4), steps=["plug.reserve"])
    assert state.error == "RuntimeError: injected failure of step plug.charge"
    assert_completed(deposit.delay(order_id=5))
    assert saga_faults.fired("plug.charge") == 1


def test_timeout_cuts_the_step_off_as_a_hard_time_limit_does(saga_worker: Any, saga_faults: SagaFaults) -> None:
    saga_faults.timeout("plug.ship")

    # The step was cut off mid-way, so its effect is unknown: it is
    # compensated blind, before the steps that completed.
    state = assert_compensated(
        order.delay(order_id=6), steps=["plug.ship", "plug.charge", "plug.reserve"], failed_step="plug.ship"
    )

    assert state.error is not None and state.error.startswith("TimeLimitExceeded")
    assert state.reason == "timeout"
    assert state.step("plug.ship").status is StepStatus.UNKNOWN
    assert state.step("plug.ship").timed_out


def test_fail_compensation_fails_it_n_times_then_lets_it_run(
    saga_worker: Any, saga_faults: SagaFaults, ledger: Callable[[], list[str]]
) -> None:
    # Given shipping fails, and refunding the charge fails twice
    saga_faults.fail("plug.ship")
    saga_faults.fail_compensation("plug.charge", times=2)

    # When an order is placed
    state = assert_compensated(order.delay(order_id=7), steps=["plug.charge", "plug.reserve"])

    # Then the third attempt refunds; a retrying compensation does not hold the others back
    assert state.step("plug.charge").compensation_attempts == 3
    assert state.step("plug.reserve").compensation_attempts == 1
    assert saga_faults.fired("plug.charge", compensating=True) == 2
    entries = ledger()
    assert entries[:2] == ["do:plug.reserve", "do:plug.charge"]
    assert sorted(entries[2:]) == ["undo:plug.charge", "undo:plug.reserve"]


def test_assert_failed_checks_which_compensations_gave_up(
    saga_test_app: Celery, saga_worker: Any, saga_faults: SagaFaults
) -> None:
    # A change to app.conf in a test is undone after it, like the plugin's own.
    saga_test_app.conf.saga_compensation_max_retries = 1
    saga_faults.fail("plug.ship")
    saga_faults.fail_compensation("plug.charge")
    result = order.delay(order_id=8)

    state = assert_failed(result, gave_up=["plug.charge"])

    assert state.step("plug.charge").compensation_attempts == 2
    with pytest.raises(AssertionError, match=r"expected \['plug.reserve'\] to give up, but \['plug.charge'\] did"):
        assert_failed(result, gave_up=["plug.reserve"])


def test_assert_compensated_explains_a_mismatch_with_the_timeline(saga_worker: Any, saga_faults: SagaFaults) -> None:
    saga_faults.fail("plug.ship")
    result = order.delay(order_id=9)

    with pytest.raises(AssertionError) as wrong_order:
        assert_compensated(result, steps=["plug.reserve", "plug.charge"])
    with pytest.raises(AssertionError) as not_completed:
        assert_completed(result)
    with pytest.raises(AssertionError) as wrong_step:
        assert_compensated(result, failed_step="plug.charge")

    message = str(wrong_order.value)
    assert "expected compensations ['plug.reserve', 'plug.charge'], but ran ['plug.charge', 'plug.reserve']" in message
    assert f"saga {result.id} (plug_order) is COMPENSATED; step plug.ship failed: RuntimeError" in message
    assert "step          action" in message and "plug.reserve  compensation  COMPENSATED" in message
    assert str(not_completed.value).startswith("expected the saga to end COMPLETED, but saga")
    assert str(wrong_step.value).startswith("expected step plug.charge to start the rollback, but saga")


def test_waiting_gives_up_with_the_timeline(saga_test_app: Celery) -> None:
    result = order.delay(order_id=10)  # no worker: it never starts

    with pytest.raises(AssertionError, match=r"did not finish within 0.2s: saga .* is PENDING\n"):
        assert_completed(result, timeout=0.2)


def test_configured_isolates_queues_and_restores_the_conf(
    saga_test_app: Celery, saga_redis_url: str, saga_prefix: str
) -> None:
    # Given a saga started under one prefix, with no worker there
    before = dict(app.conf.changes)
    first, second = (isolated_settings(saga_redis_url, f"{saga_prefix}:{n}") for n in ("first", "second"))
    with configured(app, first):
        app.conf.task_default_priority = 3
        waiting = order.delay(order_id=11)
    assert dict(app.conf.changes) == before

    # When the same app runs a worker under another prefix
    with (
        configured(app, second),
        thread_worker(app, queues=app_queues(app)),
    ):
        assert_completed(order.delay(order_id=12))

    # Then that worker never saw the first saga's message
    with configured(app, first), redis.Redis.from_url(saga_redis_url) as client:
        assert waiting.status is SagaStatus.PENDING
        assert client.llen(f"{saga_prefix}:first:kombu:celery") == 1
    assert dict(app.conf.changes) == before


def test_app_queues_lists_every_routed_queue() -> None:
    routed = Celery("routed", set_as_current=False)
    routed.conf.task_routes = {"routed.a": {"queue": "alpha"}, "routed.b*": {"queue": "beta"}}

    @routed.task(shared=False, name="routed.a")
    def a() -> None: ...

    @routed.task(shared=False, name="routed.b")
    def b() -> None: ...

    # A step's own routing options count too.
    saga = Saga("routed_saga", [step(a, compensate=None), step(b.s().set(queue="gamma"), compensate=None)])

    assert sorted(app_queues(routed)) == ["alpha", "beta", "celery", "gamma"]
    assert saga.app is routed


def test_the_default_saga_app_says_to_override_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        pytest_plugins = ["celery_saga.testing"]

        def test_needs_an_app(saga_worker):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*override the `saga_app` fixture to return your Celery app*"])


def test_an_injected_fault_is_retried_by_the_tasks_own_autoretry(saga_worker: Any, saga_faults: SagaFaults) -> None:
    # Given a step whose task retries RuntimeError once by itself, and one injected RuntimeError
    saga_faults.fail("plug.flaky", exc=RuntimeError("blip"), times=1)
    # Then the fault is retried like a real exception, and the saga completes
    state = assert_completed(flaky_saga.delay())
    assert state.step("plug.flaky").attempts == 2


def test_a_fault_for_a_step_no_saga_has_is_refused_with_the_known_steps(saga_faults: SagaFaults) -> None:
    # A typo would inject nothing, and the test would pass for the wrong reason.
    with pytest.raises(ValueError, match="'nope' is not a step of any saga") as info:
        saga_faults.fail("nope")
    assert "plug.charge" in str(info.value) and "plug.reserve" in str(info.value)
    with pytest.raises(ValueError, match="not a step of saga 'plug_deposit'"):
        saga_faults.fail("plug.ship", saga="plug_deposit")
    with pytest.raises(ValueError, match="no saga 'plug_typo'"):
        saga_faults.timeout("plug.ship", saga="plug_typo")
    with pytest.raises(ValueError, match="has no compensation"):
        saga_faults.fail_compensation("plug.flaky")
    saga_faults.fail("plug.ship", saga="plug_order")  # a real step is accepted
    assert saga_faults.fired("plug.ship") == 0


def test_a_worker_that_cannot_stop_in_time_does_not_stop_the_next_one(
    saga_test_app: Celery, saga_redis_url: str, saga_prefix: str
) -> None:
    # Given a worker whose thread is still stopping when the test leaves it
    release = threading.Event()

    class SlowToStop(bootsteps.StartStopStep):
        # start_worker ends its worker by terminating it, not stopping it
        def terminate(self, worker: Any) -> None:
            release.wait(patience(60))

    slow = Celery(f"slow-{saga_prefix}", set_as_current=False)
    slow.steps["worker"].add(SlowToStop)
    try:
        with (
            configured(slow, isolated_settings(saga_redis_url, f"{saga_prefix}:slow")),
            pytest.raises(RuntimeError, match="failed to exit"),
            thread_worker(slow, shutdown_timeout=0.2),
        ):
            pass
        # Then the process-wide stop flag is put back, and the next worker runs sagas
        assert worker_state.should_terminate is None
    finally:
        release.set()
    with thread_worker(saga_test_app, queues=app_queues(saga_test_app)):
        assert_completed(order.delay(order_id=13))


def test_the_crash_point_depth_comes_from_the_command_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_depth(saga_crash_points, request):
            assert saga_crash_points.depth == request.config.getoption("saga_crash_points")
            print("depth:", saga_crash_points.depth)
        """
    )
    quick = pytester.runpytest("-p", "celery_saga.testing", "-p", "no:cacheprovider", "-s")
    full = pytester.runpytest("-p", "celery_saga.testing", "-p", "no:cacheprovider", "-s", "--saga-crash-points=full")
    wrong = pytester.runpytest("-p", "celery_saga.testing", "-p", "no:cacheprovider", "--saga-crash-points=deep")

    quick.assert_outcomes(passed=1)
    quick.stdout.fnmatch_lines(["*depth: quick*"])
    full.assert_outcomes(passed=1)
    full.stdout.fnmatch_lines(["*depth: full*"])
    assert wrong.ret == pytest.ExitCode.USAGE_ERROR
