"""celery_saga.admin, called directly: listing, inspecting, counting, retrying and purging sagas.

Each test gets a world under a fresh prefix: one ``cli_order`` saga in each
status (or in the statuses it asks for) plus one ``cli_refund``, with an
in-process worker running. Worlds never overlap: stopping an in-process
worker sets Celery's process-wide ``should_terminate``, which would stop
every other in-process worker too.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from celery_saga import (
    SagaCompensated,
    SagaFailed,
    SagaNotFound,
    SagaRecordCorrupt,
    SagaStateError,
    SagaStatus,
    SagaStoreUnavailable,
    list_sagas,
    purge_saga,
    retry_saga,
    saga_state,
    saga_stats,
)
from celery_saga.admin import iso, state_json
from celery_saga.redis_server import free_port
from celery_saga.store.keys import Keys
from celery_saga.stores import store_for
from tests import cli_app
from tests.cli_app import STATES, wait_for
from tests.helpers import patience

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


fresh, world = cli_app.world_fixtures("sagaadmin")


def test_list_every_status_newest_first(world) -> None:
    found = list_sagas(world.shop.app)
    assert {s.saga_id: s.status.value for s in found} == {
        **{world.ids[s]: s for s in STATES},
        world.refund.id: "COMPLETED",
    }
    times = [s.status_at for s in found]
    assert all(times) and times == sorted(times, reverse=True)
    failed = next(s for s in found if s.saga_id == world.ids["FAILED"])
    assert (failed.name, failed.failed_step, failed.error) == (
        "cli_order",
        "cli.charge",
        "RuntimeError: charge declined",
    )
    assert failed.created_at is not None and failed.created_at <= failed.status_at
    assert failed.to_json() == {
        "id": failed.saga_id,
        "name": "cli_order",
        "status": "FAILED",
        "status_at": iso(failed.status_at),
        "created_at": iso(failed.created_at),
        "failed_step": "cli.charge",
        "error": "RuntimeError: charge declined",
    }
    assert ISO.match(failed.to_json()["status_at"])


def test_list_filters(world) -> None:
    app = world.shop.app
    for status in STATES:
        assert {s.saga_id for s in list_sagas(app, status=status)} == (
            {world.ids[status]} if status != "COMPLETED" else {world.refund.id, world.ids["COMPLETED"]}
        )
    assert [s.saga_id for s in list_sagas(app, name="cli_refund")] == [world.refund.id]
    assert [s.saga_id for s in list_sagas(app, status=SagaStatus.COMPLETED, name="cli_order")] == [
        world.ids["COMPLETED"]
    ]
    everything = [s.saga_id for s in list_sagas(app)]
    assert [s.saga_id for s in list_sagas(app, limit=2)] == everything[:2]
    assert len(list_sagas(app, since=timedelta(hours=1))) == len(everything)
    assert list_sagas(app, since=datetime.now(UTC) + timedelta(minutes=1)) == []
    # A naive datetime is UTC.
    assert list_sagas(app, since=datetime.now(UTC).replace(tzinfo=None) + timedelta(minutes=1)) == []
    with pytest.raises(ValueError):
        list_sagas(app, limit=0)
    with pytest.raises(ValueError):
        list_sagas(app, status="BOGUS")


def test_list_skips_index_entries_whose_record_expired(world) -> None:
    # Given index entries, newer than every saga, whose records are gone
    store = store_for(world.shop.app)
    keys = Keys(world.prefix)
    ghosts = [f"ghost-{i}" for i in range(3)]
    future = (datetime.now(UTC) + timedelta(minutes=5)).timestamp() * 1000
    for i, g in enumerate(ghosts):
        world.client.zadd(keys.name_index(keys.shard_of(g), "cli_order", "COMPLETED"), {g: future + i})
        world.client.sadd(keys.names(keys.shard_of(g)), "cli_order")
    try:
        # Then readers skip them, and read further to fill the limit
        assert store.list_ids(SagaStatus.COMPLETED, limit=1) == [ghosts[-1]]
        newest_completed = list_sagas(world.shop.app, status="COMPLETED")[0].saga_id
        assert newest_completed in (world.refund.id, world.ids["COMPLETED"])
        assert [s.saga_id for s in list_sagas(world.shop.app, status="COMPLETED", limit=1)] == [newest_completed]
        assert [s.saga_id for s in list_sagas(world.shop.app, status="COMPLETED", name="cli_order", limit=1)] == [
            world.ids["COMPLETED"]
        ]
        assert len(list_sagas(world.shop.app)) == len(STATES) + 1
    finally:
        for g in ghosts:
            world.client.zrem(keys.name_index(keys.shard_of(g), "cli_order", "COMPLETED"), g)


def test_saga_state_and_its_json(world) -> None:
    state = saga_state(world.shop.app, world.ids["FAILED"])
    assert state.status is SagaStatus.FAILED
    doc = state_json(state)
    assert list(doc) == [
        "id",
        "name",
        "status",
        "status_at",
        "created_at",
        "idempotency_key",
        "failed_step",
        "error",
        "reason",
        "kwargs",
        "data",
        "settings",
        "timeout",
        "deadline",
        "steps",
        "search_keys",
        "rerun_of",
        "reruns",
    ]
    assert (doc["id"], doc["status"], doc["failed_step"]) == (world.ids["FAILED"], "FAILED", "cli.charge")
    reserve, charge, ship = doc["steps"]
    assert reserve["status"] == "COMPLETED" and reserve["result"] == {"reservation": f"r-{world.tokens['FAILED']}"}
    assert ISO.match(reserve["started_at"]) and ISO.match(reserve["ended_at"])
    assert reserve["compensation"] == {
        "task": "cli.undo",
        "status": "GAVE_UP",
        "attempts": 1,
        "started_at": reserve["compensation"]["started_at"],
        "ended_at": reserve["compensation"]["ended_at"],
        "error": "RuntimeError: refund of cli.reserve is down",
        "deadline": reserve["compensation"]["deadline"],  # of its last attempt
        "round2": None,
    }
    assert ISO.match(reserve["compensation"]["deadline"])
    assert charge["status"] == "FAILED" and charge["error"] == "RuntimeError: charge declined"
    assert charge["compensation"]["status"] is None  # a failed step is not compensated
    assert ship == {
        "name": "cli.ship",
        "task": "cli.ship",
        "stage": 2,
        "status": "WAITING",
        "attempts": 0,
        "started_at": None,
        "ended_at": None,
        "error": None,
        "result": None,
        "timeout": 300.0,
        "deadline": None,  # never dispatched
        "stopped_by": None,
        "late": None,
        "compensation": None,
    }
    running = state_json(saga_state(world.shop.app, world.ids["RUNNING"]))
    assert [s["status"] for s in running["steps"]] == ["COMPLETED", "RUNNING", "WAITING"]
    compensating = state_json(saga_state(world.shop.app, world.ids["COMPENSATING"]))
    # Both compensations fail forever: each is between attempts (RETRYING), or in one (RUNNING) as it is read
    # (a busy machine widens that window), as test_cli's show of the same saga allows too.
    undoing = [s["compensation"] for s in compensating["steps"][:2]]
    assert [c["status"] if c["status"] != "RUNNING" else "RETRYING" for c in undoing] == ["RETRYING", "RETRYING"]
    assert all(c["attempts"] >= 2 for c in undoing)


def test_saga_state_not_found_or_corrupt(world) -> None:
    with pytest.raises(SagaNotFound, match="not found or expired"):
        saga_state(world.shop.app, "no-such-saga")
    bad = f"corrupt-{uuid.uuid4().hex[:6]}"
    world.client.hset(Keys(world.prefix).record(bad), mapping={"status": "COMPLETED", "name": "cli_order", "plan": "{"})
    try:
        with pytest.raises(SagaRecordCorrupt, match=bad):
            saga_state(world.shop.app, bad)
    finally:
        world.client.delete(Keys(world.prefix).record(bad))


def test_saga_stats(world) -> None:
    stats = saga_stats(world.shop.app)
    assert stats.by_status == {s: 2 if s == "COMPLETED" else 1 for s in STATES}
    assert stats.by_name == {
        "cli_order": {s: 1 for s in STATES},
        "cli_refund": {s: 1 if s == "COMPLETED" else 0 for s in STATES},
    }
    assert stats.to_json() == {"by_status": dict(stats.by_status), "by_name": stats.by_name}


def test_retry_and_purge_refused_by_status(world) -> None:
    app = world.shop.app
    for status in ("PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED"):
        with pytest.raises(SagaStateError, match="only a FAILED saga") as info:
            retry_saga(app, world.ids[status])
        assert (info.value.saga_id, info.value.action) == (world.ids[status], "retry")
        assert info.value.status == status
    for status in ("PENDING", "RUNNING", "COMPENSATING"):
        with pytest.raises(SagaStateError, match="only a finished saga") as info:
            purge_saga(app, world.ids[status])
        assert info.value.status == status
        assert saga_state(app, world.ids[status]).status.value == status
    for op in (retry_saga, purge_saga):
        with pytest.raises(SagaNotFound, match="not found or expired"):
            op(app, "no-such-saga")


def test_retry_redrives_compensation_that_gave_up(fresh) -> None:
    with fresh("FAILED") as w:
        app, saga_id = w.shop.app, w.ids["FAILED"]
        assert w.shop.callbacks(saga_id) == ["failed"]

        # When an operator retries while the compensation is still broken
        result = retry_saga(app, saga_id)
        assert result.id == saga_id
        # Then it runs once more with a fresh budget, gives up again, and on_failure is sent again
        wait_for(lambda: w.shop.callbacks(saga_id) == ["failed", "failed"], what="on_failure after the first retry")
        state = saga_state(app, saga_id)
        assert state.status is SagaStatus.FAILED
        assert state.step("cli.reserve").compensation_attempts == 2
        with pytest.raises(SagaFailed):
            result.get(timeout=patience(5))

        # When the compensation is fixed and the saga retried again
        w.client.delete(f"{w.prefix}:broken:{w.tokens['FAILED']}")
        retry_saga(app, saga_id)

        # Then the saga ends COMPENSATED, undone once, with on_failure sent for the new outcome
        with pytest.raises(SagaCompensated):
            result.get(timeout=patience(15))
        wait_for(lambda: len(w.shop.callbacks(saga_id)) == 3, what="on_failure after the second retry")
        assert w.client.lrange(f"{w.prefix}:undone:{w.tokens['FAILED']}", 0, -1) == ["cli.reserve"]
        assert [s.saga_id for s in list_sagas(app, status="COMPENSATED")] == [saga_id]
        assert list_sagas(app, status="FAILED") == []
        with pytest.raises(SagaStateError, match="it is COMPENSATED"):
            retry_saga(app, saga_id)


def test_purge_removes_finished_sagas(fresh) -> None:
    with fresh("COMPLETED", "COMPENSATED", "FAILED") as w:
        app = w.shop.app
        for status in ("COMPLETED", "COMPENSATED", "FAILED"):
            purge_saga(app, w.ids[status])
            with pytest.raises(SagaNotFound):
                saga_state(app, w.ids[status])
            with pytest.raises(SagaNotFound):
                purge_saga(app, w.ids[status])
        assert [s.saga_id for s in list_sagas(app)] == [w.refund.id]
        assert saga_stats(app).by_name["cli_order"] == {s: 0 for s in STATES}


def test_purge_removes_a_corrupt_finished_record(world) -> None:
    bad = f"corrupt-{uuid.uuid4().hex[:6]}"
    keys = Keys(world.prefix)
    world.client.hset(keys.record(bad), mapping={"status": "FAILED", "name": "cli_order", "status_at": "x"})
    world.client.zadd(keys.name_index(keys.shard_of(bad), "cli_order", "FAILED"), {bad: 1})
    world.client.sadd(keys.names(keys.shard_of(bad)), "cli_order")
    # Listed leniently, then purged with its index entry.
    assert bad in [s.saga_id for s in list_sagas(world.shop.app, status="FAILED")]
    purge_saga(world.shop.app, bad)
    assert not world.client.exists(keys.record(bad))
    assert world.client.zscore(keys.name_index(keys.shard_of(bad), "cli_order", "FAILED"), bad) is None


def test_store_unavailable_masks_the_password() -> None:
    shop = cli_app.create(f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0", f"sagaadmin-{uuid.uuid4().hex[:6]}", "q")
    try:
        for call in (lambda: list_sagas(shop.app), lambda: saga_stats(shop.app), lambda: saga_state(shop.app, "x")):
            with pytest.raises(SagaStoreUnavailable) as info:
                call()
            assert "s3cret-pw" not in str(info.value) and ":**@" in str(info.value)
    finally:
        shop.app.close()
        shop.client.close()
