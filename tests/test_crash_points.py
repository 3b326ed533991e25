"""The crash-point explorer (``saga_crash_points``) against planted bugs, with real killed workers.

Each test explores a saga of tests/crash_shop.py at the depth of
``--saga-crash-points`` (quick unless told): every run kills a real
``celery worker`` process group at one point and recovers on a new one.
The planted bugs give the same failures at both depths: the points that do
not expose a bug pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_saga import SagaResult, SagaState, SagaStatus
from celery_saga.enqueue import enqueuer
from celery_saga.stores import store_for
from celery_saga.testing import CrashExplorer, CrashReport
from celery_saga.testing.crash import DEPTHS
from celery_saga.testing.setup import delete_keys
from tests import crash_shop

# Each exploration runs a saga 5 to 11 times, each run with a killed worker.
pytestmark = pytest.mark.timeout(300)

APP = "tests.crash_shop"


@pytest.fixture
def books(saga_redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    # The explorer's workers inherit the environment: the shop's books are where the invariant reads them.
    prefix = f"crashshop-{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("CRASH_SHOP_REDIS", saga_redis_url)
    monkeypatch.setenv("CRASH_SHOP_PREFIX", prefix)
    yield prefix
    delete_keys(saga_redis_url, prefix)


def failed_points(report: CrashReport) -> set[tuple[str, str, int]]:
    return {(p.step, p.kind, p.number) for p in report.failures}


def processes_of(report: CrashReport) -> list[int]:
    """PIDs of live processes started for this exploration: its workers' command lines hold its key prefix."""
    tag, found = Path(report.log_dir).name, []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if tag.encode() in cmdline:
                found.append(int(entry.name))
    return found


def test_a_sound_saga_passes_every_crash_point(saga_crash_points: CrashExplorer, books: str) -> None:
    # Given a saga whose steps and compensations each apply once by their key
    depth = DEPTHS[saga_crash_points.depth]

    judged: list[str] = []

    def invariant(result: SagaResult) -> None:
        judged.append(result.id)
        crash_shop.balanced(result)
        # Its lock was given back with its end, wherever the worker died, and nobody waits for it
        assert result.state().lock_status is None
        assert store_for(result.app).lock_queue("l:order:1") == ([], [])

    # When it is explored (its last step always fails, so it has compensation points too;
    # it takes a lock, order:1, which every run needs in turn)
    report = saga_crash_points.explore(crash_shop.sound, {"order_id": 1}, invariant, app_path=APP)

    # Then every run ended undone, and every point of every step and compensation was reached
    assert report.ok, report.summary()
    assert report.baseline.status is SagaStatus.COMPENSATED
    steps = ["crash.reserve", "crash.charge", "crash.decline"]
    expected = [(s, "step", int(n)) for s in steps for n in depth]
    expected += [(s, "compensation", int(n)) for s in ("crash.charge", "crash.reserve") for n in depth]
    assert [(p.step, p.kind, p.number) for p in report.points] == expected, report.summary()
    assert report.skipped == ()
    assert {p.status for p in report.points} == {SagaStatus.COMPENSATED}
    assert all(p.seconds > 0 for p in report.points)
    assert "crash.charge (compensation) point 3" in report.summary()
    # Each run is a fresh saga, judged once after it finished
    assert judged == [p.saga_id for p in report.points]
    assert len(set(judged)) == len(judged) and report.baseline.saga_id not in judged
    # And no worker is left behind
    assert processes_of(report) == []


def test_a_compensation_that_undoes_twice_is_found_at_its_point_3(saga_crash_points: CrashExplorer, books: str) -> None:
    # Given a compensation that gives the stock back every time it runs (acks_late)
    step = "crash.reserve_then_release_unchecked"

    # (Only its points: decline is crash_sound's, which passes every point above.)
    report = saga_crash_points.explore(
        crash_shop.double_release, {"order_id": 2}, crash_shop.balanced, app_path=APP, points=[step]
    )

    # Then only its redelivery after it ran, before its outcome was written, undoes twice
    assert failed_points(report) == {(step, "compensation", 3)}, report.summary()
    failure = report.failures[0]
    assert "undone, but the shop holds {'stock': 1" in (failure.error or "")
    assert f"FAILED at {step} (compensation) point 3" in report.summary()
    assert report.baseline.error is None


def test_a_step_without_its_idempotency_key_is_found_at_its_point_3(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a charge that ignores its idempotency key (acks_late)
    # (Only its points: reserve is crash_sound's, which passes every point above.)
    report = saga_crash_points.explore(
        crash_shop.double_charge, {"order_id": 3}, crash_shop.balanced, app_path=APP, points=["crash.charge_unkeyed"]
    )

    # Then it charges twice when it is redelivered after it ran, and nowhere else
    assert failed_points(report) == {("crash.charge_unkeyed", "step", 3)}, report.summary()
    assert report.failures[0].status is SagaStatus.COMPLETED
    assert "'charged': 2" in (report.failures[0].error or "")


def test_a_worker_killed_right_after_the_done_that_pushed_the_next_stage_leaves_it_to_run_once(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a charge that charges on every run it gets (no idempotency key), after a reservation whose
    # done pushes the charge's message itself: the broker is the saga store's Redis (celery_saga.enqueue)
    pushing: list[bool] = []

    def invariant(result: SagaResult) -> None:
        pushing.append(enqueuer(result.app, store_for(result.app)) is not None)
        crash_shop.balanced(result)

    report = saga_crash_points.explore(
        crash_shop.double_charge, {"order_id": 5}, invariant, app_path=APP, points={"crash.reserve": [4]}
    )
    assert pushing == [True]

    # When the worker is killed right after that done (the charge queued, the reservation's message unacked)
    # Then the reservation comes back, finds its outcome recorded, and the charge still ran exactly once
    assert report.ok, report.summary()
    assert [(p.step, p.number, p.status) for p in report.points] == [("crash.reserve", 4, SagaStatus.COMPLETED)]


def test_each_run_takes_its_own_kwargs_after_a_reset_and_the_baseline_is_not_judged(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    resets: list[str] = []
    judged: list[int] = []
    asked: list[int] = []

    def kwargs(run: int) -> dict[str, int]:
        asked.append(run)
        return {"order_id": 100 + run}

    def invariant(result: SagaResult) -> None:
        judged.append(result.state().kwargs["order_id"])
        crash_shop.balanced(result)

    # Given kwargs as a function of the run's number, a reset hook and a pool of 2
    report = saga_crash_points.explore(
        crash_shop.sound,
        kwargs,
        invariant,
        app_path=APP,
        points=[("crash.reserve", 2, "step")],
        reset=lambda: resets.append("reset"),
        concurrency=2,
    )
    # Then the baseline ran with run 0's kwargs and the crash run with run 1's, each after a reset
    assert report.ok, report.summary()
    assert asked == [0, 1] and judged == [101] and resets == ["reset", "reset"]
    # And the summary says the baseline, whose invariant is never called, was not judged
    no_crash = next(line for line in report.summary().splitlines() if line.startswith("no crash"))
    assert "not judged" in no_crash and "ok" not in no_crash.split()


def test_a_compensation_that_needs_the_step_result_is_found_where_the_outcome_is_unknown(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a refund that reads step_result, and a charge whose lost message is settled by its deadline
    # (Only its points: reserve is crash_sound's, which passes every point above.)
    report = saga_crash_points.explore(
        crash_shop.blind_refund, {"order_id": 4}, crash_shop.balanced, app_path=APP, points=["crash.charge_once"]
    )

    # Then the runs where the charge started and its message was lost (unknown outcome) end FAILED
    assert failed_points(report) == {("crash.charge_once", "step", 2), ("crash.charge_once", "step", 3)}, (
        report.summary()
    )
    assert {p.status for p in report.failures} == {SagaStatus.FAILED}
    assert all("TypeError" in (p.error or "") for p in report.failures), report.summary()
    # The explorer says what it shortened for its runs.
    assert any("deadlines capped" in note for note in report.notes)


def test_a_run_that_does_not_finish_fails_its_point_and_leaves_no_worker(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a run that cannot finish in time: the lost charge waits for its (shortened) deadline
    report = saga_crash_points.explore(
        crash_shop.blind_refund,
        {"order_id": 5},
        crash_shop.balanced,
        app_path=APP,
        points={"crash.charge_once": [2]},
        timeout=3,
    )

    # Then that point fails as not finished, and no process of the exploration is left
    assert [(p.step, p.number, p.status) for p in report.points] == [("crash.charge_once", 2, None)]
    assert "did not finish within 3s" in (report.failures[0].error or "")
    assert not report.ok
    assert processes_of(report) == []


def test_points_name_steps_and_numbers_and_a_wrong_name_says_which_exist(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    with pytest.raises(ValueError, match=r"names no step of saga 'crash_sound'.*crash\.charge"):
        saga_crash_points.explore(
            crash_shop.sound, {"order_id": 6}, crash_shop.balanced, app_path=APP, points=["crash.chrage"]
        )
    with pytest.raises(ValueError, match="restart must be None or one of"):
        saga_crash_points.explore(
            crash_shop.sound,
            {"order_id": 6},
            crash_shop.balanced,
            app_path=APP,
            restart="same",  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="names no step"):
        saga_crash_points.explore(
            crash_shop.sound,
            {"order_id": 6},
            crash_shop.balanced,
            app_path=APP,
            points=[("crash.reserve", 2), ("x", 3)],
        )


def test_a_sound_saga_passes_every_crash_point_with_its_only_worker_restarted(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a sound saga whose steps and compensations are acks_late, explored
    # with its only worker killed whole and started again under its node name:
    # the new instance declares what the dead one ran lost while its message comes back.
    # (The quick depth kills it in the charge and its refund only: the example project's test
    # explores every quick point of its saga this way, and full depth every point here.)
    full = saga_crash_points.depth == "full"
    points = None if full else {"crash.charge": [2, 3]}
    report = saga_crash_points.explore(
        crash_shop.sound, {"order_id": 7}, crash_shop.balanced, app_path=APP, restart="same-name", points=points
    )

    # Then every run still ends undone, each effect undone once
    assert report.ok, report.summary()
    assert report.skipped == ()
    assert len(report.points) == (5 * len(DEPTHS[saga_crash_points.depth]) if full else 4)  # step and compensation
    assert {p.status for p in report.points} == {SagaStatus.COMPENSATED}
    assert report.restart == "same-name" and "its only worker restarted (same-name)" in report.summary()
    assert any("under the same node name" in note for note in report.notes)
    assert processes_of(report) == []


def test_a_worker_restarted_under_a_new_name_finds_the_lost_step_after_lost_after(
    saga_crash_points: CrashExplorer, books: str
) -> None:
    # Given a charge (not acks_late: its killed message is gone) whose refund cannot run blind
    seen: list[SagaState] = []

    def invariant(result: SagaResult) -> None:
        seen.append(result.state())
        crash_shop.balanced(result)

    # When its only worker is killed while the charge runs, and comes back under another node name
    report = saga_crash_points.explore(
        crash_shop.blind_refund,
        {"order_id": 8},
        invariant,
        app_path=APP,
        points={"crash.charge_once": [2]},
        restart="new-name",
    )

    # Then the new worker's sweeper declared the dead instance lost (not the
    # charge's deadline): the blind refund breaks as it does at the deadline
    [point] = report.points
    assert (point.status, point.stopped_by) == (SagaStatus.FAILED, "lost"), report.summary()
    charge = seen[0].step("crash.charge_once")
    assert "WorkerLostError: worker saga-crash-" in (charge.error or ""), charge.error
    assert "TypeError" in (point.error or "")
    assert any("under a new node name" in note for note in report.notes)
