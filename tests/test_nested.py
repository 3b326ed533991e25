"""Sagas made of sagas: a trip of a flight saga and a hotel saga, then a charge. Real Redis, real workers.

Every step and compensation writes a ledger entry (action, step, its
idempotency key); a step fails when the saga data names it in ``fail``, and
waits at a gate when it names it in ``gates``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDefinitionError,
    SagaFailed,
    SagaResult,
    SagaStatus,
    StepStatus,
    current_step,
    saga_step,
)
from celery_saga.admin import child_states
from celery_saga.views import saga_text, state_json
from tests.helpers import Gates, patience, wait_for


def build(app: Celery, client: redis.Redis, prefix: str) -> SimpleNamespace:
    gates = Gates(client, prefix)

    def log(action: str) -> None:
        ctx = current_step()
        assert ctx is not None
        client.rpush(f"{prefix}:ledger", json.dumps([action, ctx.step, ctx.idempotency_key, ctx.saga_id]))

    def behave(name: str, fail: list[str] | None, held: list[str] | None) -> None:
        if held and name in held:
            gates.enter(name)
        if fail and name in fail:
            log("failed")
            raise RuntimeError(f"{name} said no")
        log("do")

    @app.task(shared=False, name="n.undo")
    def undo(step_result: Any = None) -> None:
        ctx = current_step()
        assert ctx is not None
        if client.hincrby(f"{prefix}:undo_fail", ctx.step, -1) >= 0:
            raise RuntimeError(f"undo of {ctx.step} is down")
        log("undo")

    @saga_step(compensate=undo)
    @app.task(shared=False, name="n.book_flight")
    def book_flight(trip: str, fail: list[str] | None = None, gates: list[str] | None = None) -> dict[str, str]:
        behave("book_flight", fail, gates)
        return {"flight": f"FL-{trip}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="n.seat")
    def seat(flight: str, fail: list[str] | None = None, gates: list[str] | None = None) -> dict[str, str]:
        behave("seat", fail, gates)
        return {"seat": f"{flight}-12A"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="n.book_hotel")
    def book_hotel(trip: str, fail: list[str] | None = None, gates: list[str] | None = None) -> dict[str, str]:
        behave("book_hotel", fail, gates)
        return {"hotel": f"HO-{trip}"}

    @saga_step(compensate=undo)
    @app.task(shared=False, name="n.charge")
    def charge(flight: str, hotel: str, fail: list[str] | None = None, gates: list[str] | None = None) -> None:
        behave("charge", fail, gates)

    flight = Saga("flight", [book_flight, seat])
    hotel = Saga("hotel", [book_hotel])
    trip = Saga("trip", [flight, hotel, charge])
    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


@pytest.fixture
def shop(app: Celery, r: redis.Redis, prefix: str) -> SimpleNamespace:
    return build(app, r, prefix)


def ledger(r: redis.Redis, prefix: str) -> list[tuple[str, str]]:
    return [(e[0], e[1]) for e in map(json.loads, r.lrange(f"{prefix}:ledger", 0, -1))]


def test_a_trip_of_two_child_sagas_completes_with_their_data(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.trip.delay(trip="t1")
        data = res.get(timeout=patience(60))
    # The children's final data was merged into the trip's, and the charge saw it
    assert (data["flight"], data["seat"], data["hotel"]) == ("FL-t1", "FL-t1-12A", "HO-t1")
    assert ledger(r, prefix) == [("do", "n.book_flight"), ("do", "n.seat"), ("do", "n.book_hotel"), ("do", "n.charge")]
    # Each child is a saga of its own, with a derived id, its own steps' idempotency keys, and a link to its parent
    flight = SagaResult(f"{res.id}:flight", app=app).state()
    assert (flight.name, flight.status, flight.parent_id, flight.parent_step) == (
        "flight",
        SagaStatus.COMPLETED,
        res.id,
        "flight",
    )
    keys = {e[1]: e[2] for e in map(json.loads, r.lrange(f"{prefix}:ledger", 0, -1))}
    assert keys["n.seat"] == f"{res.id}:flight:n.seat" and keys["n.charge"] == f"{res.id}:n.charge"
    # ... shown with the parent, and the parent's show says how each child is doing
    state = res.state()
    assert state.step("flight").child_id == f"{res.id}:flight"
    text = saga_text(state, child_states(app, state))
    assert f"child saga {res.id}:flight: COMPLETED" in text and f"child saga {res.id}:hotel: COMPLETED" in text
    assert f"child saga of {res.id} (its step flight)" in saga_text(flight)
    assert state_json(flight)["parent"] == {"id": res.id, "step": "flight"}


def test_a_parent_failing_after_two_children_completed_undoes_each_child_as_a_unit_in_reverse(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.trip.delay(trip="t2", fail=["charge"])
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(60))
        # The hotel saga was undone first, then the flight saga, each by its own compensations, in reverse
        for child in ("hotel", "flight"):
            wait_for(lambda c=child: SagaResult(f"{res.id}:{c}", app=app).state().status.finished)
    assert info.value.reason == "failure" and info.value.step == "n.charge"
    assert ledger(r, prefix) == [
        ("do", "n.book_flight"),
        ("do", "n.seat"),
        ("do", "n.book_hotel"),
        ("failed", "n.charge"),
        ("undo", "n.book_hotel"),
        ("undo", "n.seat"),
        ("undo", "n.book_flight"),
    ]
    for child in ("hotel", "flight"):
        state = SagaResult(f"{res.id}:{child}", app=app).state()
        assert (state.status, state.reason) == (SagaStatus.COMPENSATED, "parent")
    trip = res.state()
    assert trip.step("flight").compensation_status.value == "COMPENSATED"  # type: ignore[union-attr]


def test_a_child_saga_that_rolls_back_fails_its_step_and_the_parent_rolls_back(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    with worker():
        res = shop.trip.delay(trip="t3", fail=["book_hotel"])
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(60))
    # The hotel saga rolled back on its own (nothing left to undo in it); the trip undid the flight saga
    assert info.value.step == "hotel" and "child saga" in (info.value.error or "")
    hotel = SagaResult(f"{res.id}:hotel", app=app).state()
    assert (hotel.status, hotel.reason) == (SagaStatus.COMPENSATED, "failure")
    assert res.state().step("hotel").status is StepStatus.FAILED
    assert ledger(r, prefix) == [
        ("do", "n.book_flight"),
        ("do", "n.seat"),
        ("failed", "n.book_hotel"),
        ("undo", "n.seat"),
        ("undo", "n.book_flight"),
    ]


def test_a_child_saga_that_ends_failed_makes_the_parent_failed(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given the flight saga's seat undo is down for good, and no compensation retries
    app.conf.saga_compensation_max_retries = 0
    r.hset(f"{prefix}:undo_fail", "n.seat", 100)
    with worker():
        res = shop.trip.delay(trip="t4", fail=["book_hotel"])
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(60))
    # The hotel failed, the trip undid the flight saga, whose seat compensation gave up: all FAILED
    flight = SagaResult(f"{res.id}:flight", app=app).state()
    assert (flight.status, flight.reason) == (SagaStatus.FAILED, "parent")
    assert list(info.value.gave_up) == ["flight"]


def test_cancelling_the_parent_while_a_child_runs_cancels_the_child(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    gates = Gates(r, prefix)
    with worker():
        # Given the hotel saga running, its booking held
        res = shop.trip.delay(trip="t5", gates=["book_hotel"])
        gates.wait_entered("book_hotel")
        # When the trip is cancelled
        assert res.cancel() is True
        # Then the hotel saga is cancelled too: its booking, cut short, is undone blind
        hotel = SagaResult(f"{res.id}:hotel", app=app)
        wait_for(lambda: hotel.state().status.finished, what="the hotel saga to roll back")
        assert (hotel.state().status, hotel.state().reason) == (SagaStatus.COMPENSATED, "cancelled")
        assert hotel.state().step("n.book_hotel").status is StepStatus.UNKNOWN
        # ... and the trip rolls back, the flight saga undone as a unit
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(60))
        gates.open("book_hotel")  # the held booking ends late: undone again, with its result
        wait_for(lambda: hotel.state().step("n.book_hotel").second_round is not None, what="the late booking")
        wait_for(lambda: ledger(r, prefix).count(("undo", "n.book_hotel")) == 2, what="its second undo")
    assert info.value.reason == "cancelled"
    flight = SagaResult(f"{res.id}:flight", app=app).state()
    assert (flight.status, flight.reason) == (SagaStatus.COMPENSATED, "parent")
    done = ledger(r, prefix)
    assert done[:2] == [("do", "n.book_flight"), ("do", "n.seat")]
    assert done.index(("undo", "n.seat")) < done.index(("undo", "n.book_flight"))
    assert done.count(("do", "n.book_hotel")) == 1 and done[-2:] == [("do", "n.book_hotel"), ("undo", "n.book_hotel")]


def test_children_may_have_children_but_a_saga_cannot_contain_itself(shop: SimpleNamespace) -> None:
    outer = Saga("outer", [shop.trip, shop.charge.s()])
    assert set(outer.children) == {"trip"} and set(shop.trip.children) == {"flight", "hotel"}
    with pytest.raises(SagaDefinitionError, match="contains itself"):
        Saga("flight", [shop.book_hotel, shop.trip])


def test_a_parent_deadline_passing_while_a_child_runs_cancels_the_child(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    gates = Gates(r, prefix)
    with worker():
        # Given a trip with a 2 s timeout, whose hotel booking hangs
        res = shop.trip.apply_async(kwargs={"trip": "t6", "gates": ["book_hotel"]}, timeout=2.0)
        gates.wait_entered("book_hotel")
        # When the deadline passes, then the hotel saga is cancelled, and the trip rolls back for "timeout"
        with pytest.raises(SagaCompensated) as info:
            res.get(timeout=patience(60))
        hotel = SagaResult(f"{res.id}:hotel", app=app)
        wait_for(lambda: hotel.state().status.finished, what="the hotel saga to roll back")
        gates.open("book_hotel")
        wait_for(lambda: ledger(r, prefix).count(("undo", "n.book_hotel")) == 2, what="the late booking's undo")
    assert info.value.reason == "timeout"
    assert (hotel.state().status, hotel.state().reason) == (SagaStatus.COMPENSATED, "cancelled")
    flight = SagaResult(f"{res.id}:flight", app=app).state()
    assert (flight.status, flight.reason) == (SagaStatus.COMPENSATED, "parent")


def test_a_grandchild_saga_completes_and_is_undone_through_its_parent(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    # Given a holiday made of the trip saga (itself made of two sagas), then a step
    holiday = Saga("holiday", [shop.trip, shop.book_hotel.s(trip="second")])
    with worker():
        res = holiday.delay(trip="t7")
        assert res.get(timeout=patience(60))["hotel"] == "HO-second"
        grandchild = SagaResult(f"{res.id}:trip:flight", app=app).state()
        assert (grandchild.status, grandchild.parent_id) == (SagaStatus.COMPLETED, f"{res.id}:trip")
        # When one fails after the trip completed, the trip is undone as a unit, and with it its children
        # (the failure is bound to that step alone: saga data would reach the children's steps too)
        undone = Saga("holiday_undone", [shop.trip, shop.seat.s(flight="x", fail=["seat"])]).delay(trip="t8")
        with pytest.raises(SagaCompensated):
            undone.get(timeout=patience(60))
        for child in ("trip", "trip:hotel", "trip:flight"):
            wait_for(lambda c=child: SagaResult(f"{undone.id}:{c}", app=app).state().status.finished)
            state = SagaResult(f"{undone.id}:{child}", app=app).state()
            assert (state.status, state.reason) == (SagaStatus.COMPENSATED, "parent"), child


def test_a_completed_child_whose_record_is_gone_makes_the_parent_failed_not_undone(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    gates = Gates(r, prefix)
    with worker():
        # Given a trip whose flight saga completed, and whose record then expired (here: deleted)
        res = shop.trip.delay(trip="t9", gates=["book_hotel"], fail=["charge"])
        gates.wait_entered("book_hotel")
        r.delete(f"{prefix}:{{{res.id}:flight}}")
        # When the trip rolls back
        gates.open("book_hotel")
        with pytest.raises(SagaFailed) as info:
            res.get(timeout=patience(60))
    # Then it says the flight saga's effects could not be compensated
    assert list(info.value.gave_up) == ["flight"]
    assert "its effects cannot be compensated" in (info.value.gave_up["flight"] or "")
    assert ("undo", "n.book_flight") not in ledger(r, prefix)


def test_child_sagas_side_by_side_in_a_parallel_stage(
    app: Celery, shop: SimpleNamespace, r: redis.Redis, prefix: str, worker: Any
) -> None:
    from celery_saga import parallel

    both = Saga("trip_side_by_side", [parallel(shop.flight, shop.hotel), shop.charge.s(fail=["charge"])])
    with worker():
        # Both children complete, side by side; then the charge fails: each child is undone as a unit
        res = both.delay(trip="t10")
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(60))
        for child in ("flight", "hotel"):
            wait_for(lambda c=child: SagaResult(f"{res.id}:{c}", app=app).state().status.finished)
            state = SagaResult(f"{res.id}:{child}", app=app).state()
            assert (state.status, state.reason) == (SagaStatus.COMPENSATED, "parent"), child
    done = ledger(r, prefix)
    assert sorted(done[:3]) == [("do", "n.book_flight"), ("do", "n.book_hotel"), ("do", "n.seat")]
    assert done[3] == ("failed", "n.charge")
    assert sorted(done[4:]) == [("undo", "n.book_flight"), ("undo", "n.book_hotel"), ("undo", "n.seat")]
    assert done.index(("undo", "n.seat")) < done.index(("undo", "n.book_flight"))
