"""Defining sagas: every broken definition fails with an error that says what to do."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from celery import Celery, group

from celery_saga import Saga, SagaDefinitionError, parallel, saga_step, step
from tests import shop
from tests.helpers import saga_keys


def test_an_undecorated_task_is_a_definition_error(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)

    @app.task(shared=False, name="def.plain")
    def plain() -> None: ...

    with pytest.raises(SagaDefinitionError, match=r"not a saga step: decorate it with @saga_step"):
        Saga("bad", [s.reserve, plain])
    with pytest.raises(SagaDefinitionError, match="not a saga step"):
        Saga("bad", [s.reserve, plain.s()])
    # step() is the explicit way to use it anyway.
    assert Saga("ok", [s.reserve, step(plain, compensate=None)]).plan().steps[1].task == "def.plain"


def test_compensation_name_no_task_has_is_checked_once_the_app_is_finalized(app: Celery) -> None:
    @saga_step(compensate="def.no_such_task")
    @app.task(shared=False, name="def.forward")
    def forward() -> None: ...

    assert not app.finalized
    saga = Saga("missing_comp", [forward])  # not checkable yet: the app has no tasks
    with pytest.raises(SagaDefinitionError, match="no task of that name"):
        saga.delay()
    # Defined after finalize, the saga is checked at once.
    with pytest.raises(SagaDefinitionError, match=r"def\.no_such_task"):
        Saga("missing_comp2", [forward])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([], "has no steps"),
        (lambda s: [s.reserve, s.reserve], "two steps named 'shop.reserve'"),
        (lambda s: [s.reserve, parallel(s.ship)], "at least two steps"),
        (lambda s: [s.reserve, group(s.ship.s())], "at least two steps"),
        (lambda s: [parallel([s.reserve, s.charge], s.ship)], "single steps"),
        (lambda s: [s.reserve, 42], "cannot be a saga step"),
    ],
)
def test_broken_definitions(app: Celery, r, prefix, steps, message: str) -> None:
    s = shop.build(app, r, prefix)
    with pytest.raises(SagaDefinitionError, match=message):
        Saga("broken", steps(s) if callable(steps) else steps)


def test_decorator_misuse(app: Celery) -> None:
    with pytest.raises(SagaDefinitionError, match="needs compensate="):

        @saga_step()
        @app.task(shared=False, name="def.no_comp")
        def no_comp() -> None: ...

    with pytest.raises(SagaDefinitionError, match=r"above @app\.task"):

        @saga_step(compensate=None)
        def not_a_task() -> None: ...

    with pytest.raises(SagaDefinitionError, match="may not contain"):
        step("a:b", compensate=None)


def test_nothing_happens_at_import_and_finalize_enables_the_app() -> None:
    # In a fresh interpreter: importing, decorating and defining a saga
    # connects no signal, opens no connection and finalizes no app.
    code = textwrap.dedent(
        """
        import celery._state as state
        from celery import Celery, signals
        before = set(state._on_app_finalizers)
        import celery_saga
        from celery_saga import Saga, parallel, saga_step
        from celery_saga.stores import _STORES
        from celery_saga.worker.apps import is_enabled
        assert set(state._on_app_finalizers) == before
        assert not signals.task_failure.receivers and not signals.task_revoked.receivers
        app = Celery("imp", broker="redis://127.0.0.1:1/0", set_as_current=False)
        @app.task(name="imp.undo")
        def undo(): ...
        @saga_step(compensate=undo)
        @app.task(name="imp.t")
        def t(): ...
        @saga_step(compensate=None)
        @app.task(name="imp.u")
        def u(): ...
        @saga_step(compensate=None)
        @app.task(name="imp.v")
        def v(): ...
        saga = Saga("imp", [t, parallel(u, v)])
        # ... nor do the other shapes: a wait, a pivot given as a task, a child saga
        shapes = Saga("imp2", [t, celery_saga.wait_for("ok", timeout=None), Saga("imp3", [u]), v], pivot=t)
        assert not app.finalized and not app.configured
        assert not signals.task_failure.receivers and not _STORES and not is_enabled(app)
        app.finalize()
        assert is_enabled(app) and signals.task_failure.receivers and not _STORES
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_a_saga_that_knows_no_app_runs_on_the_current_one_as_celerys_canvas_does() -> None:
    # In a fresh interpreter, so the current app is the one made here.
    code = textwrap.dedent(
        """
        from celery import Celery, shared_task
        from celery_saga import Saga, saga_step, step
        @shared_task(name="dj.undo")
        def undo(): ...
        @saga_step(compensate=undo)
        @shared_task(name="dj.a")
        def a(): ...
        remote = Saga("remote", [step("svc.a", compensate="svc.undo_a")])
        shared = Saga("shared", [a])
        app = Celery("current", broker="redis://127.0.0.1:1/0")  # becomes the current app
        assert remote.app is app and shared.app is app
        assert [s.task for s in shared.plan().steps] == ["dj.a"] and shared.plan().steps[0].compensation == "dj.undo"
        other = Celery("explicit", broker="redis://127.0.0.1:1/0", set_as_current=False)
        assert Saga("pinned", [a], app=other).app is other
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("saga_retention", "a week"),
        ("saga_compensated_retention", 0),
        ("saga_failed_retention", "forever"),
        ("saga_late_outcome_window", -5),
        ("saga_dedup_window", "ten minutes"),
        ("saga_compensation_retry_backoff", -1),
        ("saga_compensation_max_retries", 1.5),
        ("saga_key_prefix", "{bad}"),
    ],
)
def test_bad_settings_say_which_setting(app: Celery, r, prefix, setting: str, value: object) -> None:
    s = shop.build(app, r, prefix)
    app.conf[setting] = value
    with pytest.raises(SagaDefinitionError, match=f"app.conf.{setting}"):
        s.sequential.delay(order_id=1)


def test_messages_workers_would_drop_fail_the_start_naming_the_settings(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    app.conf.accept_content = ["pickle"]  # task_serializer stays "json": every saga message would be refused
    with pytest.raises(SagaDefinitionError, match="task_serializer") as info:
        s.sequential.delay(order_id=1)
    assert "accept_content" in str(info.value)
    app.conf.task_serializer = "no-such-format"
    with pytest.raises(SagaDefinitionError, match="kombu does not know"):
        s.sequential.delay(order_id=1)
    assert not saga_keys(r, prefix)  # no record was written


def test_the_saga_store_defaults_to_a_redis_broker_and_needs_one_otherwise(app: Celery, r, prefix) -> None:
    s = shop.build(app, r, prefix)
    app.conf.saga_redis_url = None
    app.conf.broker_url = "amqp://guest:guest@127.0.0.1:5672//"
    with pytest.raises(SagaDefinitionError, match="saga_redis_url"):
        s.sequential.delay(order_id=1)


def test_a_valid_saga_logs_no_error_when_its_start_finalizes_the_app(
    app: Celery, r, prefix, caplog: pytest.LogCaptureFixture
) -> None:
    # Celery announces finalization before it creates the pending tasks; the
    # check must wait for them, or the compensation below looks missing.
    @app.task(shared=False, name="fin.undo")
    def undo() -> None: ...

    @saga_step(compensate="fin.undo")
    @app.task(shared=False, name="fin.do")
    def do() -> None: ...

    saga = Saga("fin", [do.s()])  # .s() creates `do` now; `undo` stays pending
    assert not app.finalized
    saga.delay()
    assert app.finalized
    assert not [rec for rec in caplog.records if rec.levelname == "ERROR"]
