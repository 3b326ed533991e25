"""One trace per saga with opentelemetry-instrumentation-celery, checked with the SDK's in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_saga import SagaCompensated, StepStatus
from celery_saga.tracing import _span_id_of, trace_id_of
from tests import shop
from tests.helpers import Gates, patience, wait_for


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def test_every_step_and_compensation_of_a_saga_is_in_one_trace_even_when_a_sweeper_sends_them(
    app: Celery, r, prefix, worker, spans: InMemorySpanExporter
) -> None:
    # Given a saga whose last step hangs past its deadline, so the sweeper sends the compensations
    app.conf.saga_default_step_timeout = 1.5
    s = shop.build(app, r, prefix)
    gates = Gates(r, prefix)
    with worker():
        res = s.sequential.delay(order_id=1, gates=["ship"])
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(30))
        gates.open("ship")
        state = res.state()
        assert state.reason == "timeout" and state.step("shop.ship").status is StepStatus.UNKNOWN

        def compensation_runs() -> list[Any]:
            return [
                sp
                for sp in spans.get_finished_spans()
                if sp.attributes and sp.attributes.get("saga.compensation") is True
            ]

        wait_for(lambda: len(compensation_runs()) >= 3, what="the compensations' run spans")

    finished = spans.get_finished_spans()
    saga_trace = trace_id_of(res.id)
    runs = [sp for sp in finished if sp.attributes and sp.attributes.get("saga.id") == res.id]
    # Then every run of the saga, forward and compensating, is in the saga's trace, with its attributes
    assert {(sp.attributes["saga.step"], sp.attributes["saga.compensation"]) for sp in runs} >= {
        ("shop.validate", False),
        ("shop.reserve", False),
        ("shop.charge", False),
        ("shop.ship", False),
        ("shop.ship", True),
        ("shop.charge", True),
        ("shop.reserve", True),
    }
    assert {sp.context.trace_id for sp in runs} == {saga_trace}
    assert {sp.attributes["saga.name"] for sp in runs} == {"order_seq"}
    # The hung step answered once its gate opened: its late result is compensated in a second round
    rounds = {
        (sp.attributes["saga.step"], sp.attributes["saga.compensation"], sp.attributes["saga.round"]) for sp in runs
    }
    assert {r for r in rounds if r[2] != 1} <= {("shop.ship", True, 2)}
    # And so are the publishes, including those the sweeper made outside any span: under the saga's own root
    publishes = [sp for sp in finished if sp.name.startswith("apply_async/") and res.id in str(sp.attributes)]
    assert publishes and {sp.context.trace_id for sp in publishes} == {saga_trace}
    undo_publishes = [sp for sp in publishes if sp.name == "apply_async/shop.undo"]
    assert undo_publishes and all(sp.parent is not None for sp in undo_publishes)
    assert any(sp.parent.span_id == _span_id_of(res.id) for sp in undo_publishes)


def test_without_opentelemetry_nothing_is_imported_and_sagas_publish_as_before(tmp_path) -> None:
    # A process where opentelemetry cannot be imported, as when it is not installed
    script = tmp_path / "no_otel.py"
    script.write_text(
        """
import sys

class NoOtel:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NoOtel())
from celery_saga import tracing
with tracing.saga_trace("6c6a1f55-3c1e-4b4e-9a51-3f5d1b8f1e2a"):
    tracing.annotate_run("6c6a1f55-3c1e-4b4e-9a51-3f5d1b8f1e2a", "n", "s", False, 1)
assert tracing._available() is False
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
print("ok")
"""
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
