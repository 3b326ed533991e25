"""One trace per saga, with OpenTelemetry (the ``otel`` extra): nothing happens, and nothing is imported, without it.

``opentelemetry-instrumentation-celery`` makes a span for each publish and
each run, and passes the trace on in the message headers. A saga's messages
are published by many processes, some with no trace at hand: the sweeper that
sends a compensation after a deadline, a worker of another service, an
operator's retry. So every saga message is published under the saga's own
trace, whose ids are derived from the saga id: any process can name it
without reading anything. A message published inside a run of the same
saga keeps that run as its parent. A process the instrumentation does not
trace publishes as before (there is no trace to join).

Each run of a step or compensation gets the span attributes ``saga.id``,
``saga.name``, ``saga.step``, ``saga.compensation`` and ``saga.round``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

__all__ = ["annotate_run", "saga_trace", "trace_id_of"]


@cache
def _available() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):  # not installed (ValueError: a module set to None)
        return False


def _instrumented() -> bool:
    """True once opentelemetry-instrumentation-celery traces this process: only then is there a trace to join."""
    module = sys.modules.get("opentelemetry.instrumentation.celery")
    return module is not None and bool(getattr(module.CeleryInstrumentor(), "is_instrumented_by_opentelemetry", False))


def trace_id_of(saga_id: str) -> int:
    """The saga's trace id: its UUID's 128 bits, or a digest of an id that is not a UUID."""
    try:
        value = uuid.UUID(saga_id).int
    except ValueError:
        value = int.from_bytes(hashlib.sha256(saga_id.encode()).digest()[:16], "big")
    return value or 1  # 0 is the invalid trace id


def _span_id_of(saga_id: str) -> int:
    return int.from_bytes(hashlib.sha256(b"span:" + saga_id.encode()).digest()[:8], "big") or 1


@contextmanager
def saga_trace(saga_id: str) -> Iterator[None]:
    """Publish what is sent inside under the saga's trace (unless a span of that trace is current)."""
    if not _available() or not _instrumented():
        yield
        return
    from opentelemetry import context, trace

    trace_id = trace_id_of(saga_id)
    if trace.get_current_span().get_span_context().trace_id == trace_id:
        yield
        return
    parent = trace.SpanContext(
        trace_id=trace_id,
        span_id=_span_id_of(saga_id),
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        yield
    finally:
        context.detach(token)


def annotate_run(saga_id: str, name: str, step: str, compensation: bool, round_: int) -> None:
    """Put the saga attributes on the current span: the run of a step or compensation."""
    if not _available():
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(
            {
                "saga.id": saga_id,
                "saga.name": name,
                "saga.step": step,
                "saga.compensation": compensation,
                "saga.round": round_,
            }
        )
