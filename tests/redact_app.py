"""The app of the redaction test's ``celery worker`` subprocess: ``celery -A tests.redact_app worker``.

Configured from the environment variables of `tests.proc_app` (its Redis, key
prefix and queue), so `tests.subprocs.proc_env` gives a subprocess its
environment. ``CELERY_SAGA_TEST_SPANS=1`` also traces the worker with
OpenTelemetry, every finished span written as JSON to the list
``<prefix>:spans`` (name, attributes, events, status).

The tasks write what they received to the ledger ``<prefix>:ledger`` as JSON
``[action, card, ...]``. ``red.charge`` redacts ``card`` and ``token`` for
the whole saga; its compensation ``red.refund`` gets the card and returns
it. ``red.tokenize`` returns a token that holds the card, ``red.flaky``
calls ``self.retry()`` once (the card in its kwargs), and ``red.decline``
raises with the card in its message.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

import redis
from celery import Celery, Task

from celery_saga import Saga, enable, saga_step, wait_for
from tests.helpers import kombu_prefix

# tests.proc_app's names (`tests.subprocs.proc_env` sets them); not imported
# from there, since importing it in a worker would build that app too.
ENV_BROKER = "CELERY_SAGA_TEST_BROKER"
ENV_PREFIX = "CELERY_SAGA_TEST_PREFIX"
ENV_QUEUE = "CELERY_SAGA_TEST_QUEUE"
ENV_SPANS = "CELERY_SAGA_TEST_SPANS"


def create(broker_url: str, prefix: str, queue: str) -> SimpleNamespace:
    """The app, its tasks and sagas, for one prefix and queue."""
    app = Celery(f"redact-{prefix}", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options={"global_keyprefix": kombu_prefix(prefix)},
        broker_connection_retry_on_startup=True,
        saga_key_prefix=prefix,
        saga_compensation_retry_backoff=0.05,
        saga_compensation_retry_backoff_max=0.5,
        task_allow_error_cb_on_chord_header=False,
        worker_enable_remote_control=False,
        worker_prefetch_multiplier=1,
    )
    enable(app)
    client = redis.Redis.from_url(broker_url, decode_responses=True)

    def log(action: str, *received: Any) -> None:
        client.rpush(f"{prefix}:ledger", json.dumps([action, *received]))

    @app.task(name="red.refund", shared=False)
    def refund(card: str, step_result: Any = None) -> dict[str, Any]:
        log("refund", card, step_result)
        return {"card": card}

    @saga_step(compensate=refund, redact=["card", "token"])
    @app.task(name="red.charge", shared=False)
    def charge(order_id: int, card: str) -> dict[str, Any]:
        log("charge", card)
        return {"charged": order_id}

    @saga_step(compensate=None)
    @app.task(name="red.tokenize", shared=False)
    def tokenize(card: str) -> dict[str, Any]:
        log("tokenize", card)
        return {"token": f"tok-{card}"}

    @saga_step(compensate=None)
    @app.task(name="red.flaky", shared=False, bind=True, max_retries=3)
    def flaky(self: Task, card: str, token: str) -> None:
        log("flaky", card, token, self.request.retries)
        if not self.request.retries:
            raise self.retry(countdown=0)

    @saga_step(compensate=None)
    @app.task(name="red.decline", shared=False)
    def decline(card: str) -> None:
        log("decline", card)
        raise ValueError(f"card {card} declined")

    declined = Saga("red_declined", [charge, tokenize, flaky, decline])
    denied = Saga("red_denied", [charge, wait_for("approval", timeout=60, reject="denied")])

    def ledger() -> list[list[Any]]:
        return [json.loads(x) for x in client.lrange(f"{prefix}:ledger", 0, -1)]

    def spans() -> list[str]:
        return list(client.lrange(f"{prefix}:spans", 0, -1))

    return SimpleNamespace(**{k: v for k, v in locals().items() if not k.startswith("_")})


def _trace_to_redis(client: redis.Redis, key: str) -> None:
    """Trace this process with opentelemetry-instrumentation-celery; each finished span goes to list ``key``."""
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class ToRedis(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            for span in spans:
                assert isinstance(span, ReadableSpan)
                shown = {
                    "name": span.name,
                    "attributes": dict(span.attributes or {}),
                    "events": [[e.name, dict(e.attributes or {})] for e in span.events],
                    "status": span.status.description,
                }
                client.rpush(key, json.dumps(shown, default=str))
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    # Synchronous: no exporter thread, so it works in the pool children forked after this.
    provider.add_span_processor(SimpleSpanProcessor(ToRedis()))
    CeleryInstrumentor().instrument(tracer_provider=provider)


if os.environ.get(ENV_BROKER):
    worker_ns = create(os.environ[ENV_BROKER], os.environ[ENV_PREFIX], os.environ[ENV_QUEUE])
    app = worker_ns.app
    if os.environ.get(ENV_SPANS) == "1":
        _trace_to_redis(worker_ns.client, f"{os.environ[ENV_PREFIX]}:spans")
