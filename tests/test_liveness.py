"""Worker liveness and heartbeats, in process: what a sweep pass does with a lost worker, and what `show` says.

A lost worker is made by hand: a step begun under a worker instance token
that then stops writing (``worker_stopped``: score 0, due at once). The
process tests (tests/processes/test_liveness.py) kill and freeze real workers.
"""

from __future__ import annotations

from celery import Celery

from celery_saga import Saga, SagaStatus, StepStatus, sweep
from celery_saga.admin import step_workers
from celery_saga.metrics import metrics_text
from celery_saga.store import Op, Outcome
from celery_saga.stores import store_for
from celery_saga.views import saga_text, state_json
from tests import shop


def test_a_sweep_declares_the_steps_of_a_lost_worker_lost_and_show_says_where_they_ran(app: Celery, r, prefix) -> None:
    # Given a saga whose first step began on worker instance "ghost0000001" of node ghost@h
    s = shop.build(app, r, prefix)
    res = Saga("live", [s.reserve, s.charge]).delay(order_id=1)
    store = store_for(app)
    raw = store.load(res.id)
    store.worker_alive("ghost0000001", "ghost@h", starting=True)
    begun = store.apply(
        Op.BEGIN, res.id, raw["gen"], "live", "shop.reserve", "0", "", raw["ph"], "ghost0000001", first=True
    )
    assert begun.outcome is Outcome.RUN

    # Then show names the worker it runs on, alive
    state = res.state()
    workers = step_workers(app, state)
    on = state_json(state, workers=workers)["steps"][0]["worker"]
    assert (on["instance"], on["hostname"], on["alive"]) == ("ghost0000001", "ghost@h", True)
    assert "step shop.reserve runs on ghost@h (instance ghost0000001, alive" in saga_text(state, workers=workers)
    # and a step not running has no worker entry
    assert "worker" not in state_json(state, workers=workers)["steps"][1]

    # When the instance stops writing (it stopped; a silent one is claimed after saga_worker_lost_after)
    store.worker_stopped("ghost0000001")
    report = sweep(app)

    # Then this pass claimed it and declared its running step lost: compensated blind, as a WorkerLostError would
    assert report.lost_workers == 1
    state = res.state()
    step = state.step("shop.reserve")
    assert step.status is StepStatus.UNKNOWN and step.stopped_by == "lost"
    assert step.error == "WorkerLostError: worker ghost@h (instance ghost0000001) stopped"
    assert state.status is SagaStatus.COMPENSATING and state.failed_step == "shop.reserve"
    assert 'celery_saga_steps_lost_total{cause="worker"} 1' in metrics_text(app).splitlines()
    # A second pass finds nothing more to claim
    assert sweep(app).lost_workers == 0
    assert store.workers()["ghost0000001"].lost


def test_liveness_settings_are_checked(app: Celery) -> None:
    import pytest

    from celery_saga.errors import SagaDefinitionError
    from celery_saga.settings import SagaSettings

    assert SagaSettings.from_app(app).worker_lost_after == 3 * SagaSettings.from_app(app).worker_heartbeat
    app.conf.saga_worker_heartbeat = 2
    app.conf.saga_worker_lost_after = 1
    with pytest.raises(SagaDefinitionError, match="must exceed saga_worker_heartbeat"):
        SagaSettings.from_app(app)
