"""``Saga.delay_on_commit``: a saga starts only if the Django transaction around it commits (Django, SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

from celery_saga import Saga, SagaDataError, SagaDefinitionError, SagaNotFound, SagaResult, SagaStatus, saga_stats
from tests import shop
from tests.helpers import finished

django = pytest.importorskip("django")


@pytest.fixture(scope="module")
def db() -> Iterator[Any]:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            INSTALLED_APPS=[],
            USE_TZ=True,
        )
        django.setup()
    from django.db import connection, transaction

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item TEXT)")
    yield transaction


def test_a_saga_started_on_commit_starts_after_the_commit_and_never_on_a_rollback(
    app: Celery, r, prefix, worker, db: Any
) -> None:
    from django.db import connection

    s = shop.build(app, r, prefix)
    saga = s.sequential
    # Given an order written in a transaction, with its saga started on commit
    with db.atomic():
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO orders (id, item) VALUES (7, 'book')")
        saga.apply_async_on_commit(kwargs={"order_id": 7}, idempotency_key="order-7")
        # Then inside the transaction there is no saga yet
        with pytest.raises(SagaNotFound):
            SagaResult(saga.id_for("order-7"), app=app).state()
    # And after the commit there is, and it runs
    res = SagaResult(saga.id_for("order-7"), app=app)
    with worker():
        assert finished(res) is SagaStatus.COMPLETED

    # When the transaction rolls back, no saga ever starts
    with pytest.raises(RuntimeError), db.atomic():
        saga.delay_on_commit(order_id=8)
        saga.apply_async_on_commit(kwargs={"order_id": 8}, idempotency_key="order-8")
        raise RuntimeError("the order could not be saved")
    with pytest.raises(SagaNotFound):
        SagaResult(saga.id_for("order-8"), app=app).state()
    assert sum(saga_stats(app).by_name.get("order_seq", {}).values()) == 1


def test_what_apply_async_would_refuse_raises_inside_the_transaction(app: Celery, r, prefix, db: Any) -> None:
    s = shop.build(app, r, prefix)
    saga: Saga = s.sequential
    with db.atomic():
        with pytest.raises(SagaDataError, match="order_id is of type object"):
            saga.delay_on_commit(order_id=object())
        with pytest.raises(SagaDataError, match="keyword arguments only"):
            saga.delay_on_commit(1)
        with pytest.raises(SagaDataError, match="idempotency_key"):
            saga.apply_async_on_commit(kwargs={"order_id": 1}, idempotency_key="")
        with pytest.raises(TypeError, match="unexpected options"):
            saga.apply_async_on_commit(kwargs={"order_id": 1}, countdown=3)
        # A lock's or a business key's kwarg too: a lock it cannot name, a key it cannot index
        locked = Saga("on_commit_locked", [s.reserve], lock="order:{order_id}", search_keys=("customer",))
        with pytest.raises(SagaDefinitionError, match="needs the kwarg 'order_id'"):
            locked.delay_on_commit(customer="c1")
        with pytest.raises(SagaDataError, match="search key 'customer'"):
            locked.delay_on_commit(order_id=1, customer=1.5)
