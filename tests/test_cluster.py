"""The saga store on a real 3-master Redis Cluster, the tests' own.

The broker stays the plain Redis of the other tests: kombu has no Redis
Cluster transport, so a cluster store always runs beside another broker.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import (
    Saga,
    SagaCompensated,
    SagaStatus,
    StepStatus,
    cancel_saga,
    list_sagas,
    purge_saga,
    rerun_saga,
    retry_saga,
    saga_state,
    saga_stats,
    step,
)
from celery_saga.stores import store_for
from tests import shop as shop_module
from tests import timed_shop
from tests.cli_app import cli_env
from tests.deployments import Cluster
from tests.helpers import Ledger, finished, patience, wait_for
from tests.subprocs import ROOT


@pytest.fixture
def on_cluster(app: Celery, cluster: Cluster) -> Celery:
    """The test's app, with its saga store on the cluster (its broker stays the plain Redis)."""
    app.conf.update(cluster.saga_conf)
    return app


def test_sagas_complete_and_compensate_on_a_cluster(
    on_cluster: Celery, cluster: Cluster, r: redis.Redis, prefix: str, ledger: Ledger, worker: Any
) -> None:
    s = shop_module.build(on_cluster, r, prefix)
    with worker():
        # Sequential and parallel sagas complete
        assert s.sequential.delay(order_id=1).get(timeout=patience(20))["tracking"] == "t-1"
        assert s.mixed.delay(order_id=2).get(timeout=patience(20))["tracking"] == "t-2"
        # A failing step compensates the completed ones, latest first
        with pytest.raises(SagaCompensated):
            s.sequential.delay(order_id=3, fail={"ship": "no carrier"}).get(timeout=patience(20))
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:shop.charge", "undo:shop.reserve"]
    # The records and the index shards spread over the masters (keys hash to random
    # slots: with about ten keys, all on one master of three is a 1-in-10,000 chance)
    holding = [c for c in cluster.clients() if next(c.scan_iter(match=f"{prefix}:*"), None) is not None]
    assert len(holding) >= 2
    stats = saga_stats(on_cluster)
    assert (stats.by_status["COMPLETED"], stats.by_status["COMPENSATED"]) == (2, 1)
    assert [x.status for x in list_sagas(on_cluster, limit=10)].count(SagaStatus.COMPLETED) == 2


def test_deadlines_cancel_show_and_purge_on_a_cluster(
    on_cluster: Celery, r: redis.Redis, prefix: str, ns: str, worker: Any
) -> None:
    shop = timed_shop.build(on_cluster, r, prefix)
    on_cluster.conf.task_routes = {"timed.last": {"queue": f"q-{ns}-nobody"}}
    with worker():
        # A step nobody runs times out: a sweeper fences it, and the saga rolls back
        timed = Saga("timed", [shop.reserve, step(shop.last, timeout=0.5)]).delay(qty=1)
        with pytest.raises(SagaCompensated) as info:
            timed.get(timeout=patience(15))
        assert info.value.reason == "timeout"
        assert timed.state().step("timed.last").status is StepStatus.CANCELLED

        # Cancel a running one: its running step is compensated blind
        held = Saga("held", [shop.reserve, shop.hang]).delay(qty=1, gates=["hang"])
        wait_for(lambda: shop.entered("hang"), 10, "the held step")
        assert cancel_saga(on_cluster, held.id) is True
        assert finished(held) is SagaStatus.COMPENSATED
        shop.open_gate("hang")
        wait_for(lambda: held.state().step("timed.hang").second_round, 10, "the late success's second round")
    assert shop.left() == (0, {})

    # Show, list and purge read and write the record and the sharded indexes
    assert saga_state(on_cluster, timed.id).reason == "timeout"
    assert {timed.id, held.id} <= {x.saga_id for x in list_sagas(on_cluster, status="COMPENSATED")}
    purge_saga(on_cluster, timed.id)
    assert timed.id not in {x.saga_id for x in list_sagas(on_cluster, status="COMPENSATED")}


def test_a_failed_saga_is_retried_on_a_cluster(on_cluster: Celery, r: redis.Redis, prefix: str, worker: Any) -> None:
    on_cluster.conf.saga_compensation_max_retries = 0
    s = shop_module.build(on_cluster, r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.reserve", 1)  # its first compensation attempt fails, and gives up
    with worker():
        res = s.sequential.delay(order_id=4, fail={"charge": "declined"})
        assert finished(res) is SagaStatus.FAILED
        assert res.id in {x.saga_id for x in list_sagas(on_cluster, status="FAILED")}
        retry_saga(on_cluster, res.id)
        assert finished(res) is SagaStatus.COMPENSATED
    assert res.id not in {x.saga_id for x in list_sagas(on_cluster, status="FAILED")}


def test_the_cli_reads_a_cluster_store(redis_url: str, cluster: Cluster, ns: str) -> None:
    from tests import cli_app

    prefix = f"sagacli-{ns}"
    env = {**cli_env(redis_url, prefix, "q"), cli_app.ENV_STORE: cluster.url}
    shop = cli_app.create(redis_url, prefix, "q")
    shop.app.conf.update(cluster.saga_conf)
    try:
        res = shop.order.delay(token="c")  # no worker: it stays PENDING
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", "show", res.id, "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert f'"id": "{res.id}"' in out.stdout and '"status": "PENDING"' in out.stdout
    finally:
        shop.app.close()
        for key in shop.client.scan_iter(match=f"{prefix}:*"):
            shop.client.unlink(key)
        shop.client.close()


def test_business_keys_and_reruns_on_a_cluster(
    on_cluster: Celery, cluster: Cluster, r: redis.Redis, prefix: str, worker: Any
) -> None:
    s = shop_module.build(on_cluster, r, prefix)
    keyed = Saga("keyed_order", [s.reserve, s.charge], search_keys=("order_id",))
    with worker():
        # Business keys are indexed in the start's index call, in the shard's slot
        ok = keyed.delay(order_id=7)
        undone = keyed.delay(order_id=7, fail={"charge": "declined"})
        assert (finished(ok), finished(undone)) == (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
        assert {x.saga_id for x in list_sagas(on_cluster, where={"order_id": 7})} == {ok.id, undone.id}
        # A re-run links both records, though they are in different slots
        again = rerun_saga(on_cluster, undone.id)
        assert finished(again) is SagaStatus.COMPENSATED
        assert saga_state(on_cluster, undone.id).reruns == (again.id,)
        assert saga_state(on_cluster, again.id).rerun_of == undone.id
    # Purge takes the entries with it (a separate call on a cluster)
    purge_saga(on_cluster, ok.id)
    members = [m for c in cluster.clients() for k in c.scan_iter(match=f"{prefix}:*:k:*") for m in c.zrange(k, 0, -1)]
    assert len(members) == 2 and not any(m.endswith(ok.id) for m in members)
    # And an entry whose record is gone is collected
    for c in cluster.clients():
        for key in c.scan_iter(match=f"{prefix}:{{{undone.id}}}"):
            c.delete(key)
    assert store_for(on_cluster).collect_search() == 1
    assert {x.saga_id for x in list_sagas(on_cluster, where={"order_id": 7})} == {again.id}
