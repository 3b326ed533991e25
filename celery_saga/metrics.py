"""Prometheus metrics of every saga under a prefix, in the text exposition format (``/metrics``).

The counters are kept by the transitions themselves (store/keys.py,
``metrics``), so they are exact across workers and across restarts of
whatever serves them; the in-flight and failed gauges are read from the indexes. On a
Redis Cluster store the transitions keep no counters: only the gauge is
served.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from celery import Celery

from .state import SagaStatus
from .store.keys import DURATION_BUCKETS
from .stores import store_for

__all__ = ["metrics_text"]

_IN_FLIGHT = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)


def _labels(**labels: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def metrics_text(app: Celery) -> str:
    """Every saga metric of ``app``'s store, as Prometheus text."""
    store = store_for(app)
    counters, counts = store.counters(), store.counts()
    started, finished, compfail, rejected, lost = [], [], [], [], []
    buckets: dict[tuple[str, str], dict[int, int]] = defaultdict(dict)
    sums: dict[tuple[str, str], int] = {}
    for field, value in sorted(counters.items()):
        kind, _, rest = field.partition(":")
        parts = rest.split(":")
        if kind == "started" and len(parts) == 1:
            started.append(f"celery_saga_started_total{_labels(name=parts[0])} {value}")
        elif kind == "finished" and len(parts) == 3:
            labels = _labels(name=parts[0], status=parts[1], reason=parts[2])
            finished.append(f"celery_saga_finished_total{labels} {value}")
        elif kind == "rejected" and len(parts) == 1:
            rejected.append(f"celery_saga_rejected_messages_total{_labels(reason=parts[0])} {value}")
        elif kind == "lost" and len(parts) == 1:
            lost.append(f"celery_saga_steps_lost_total{_labels(cause=parts[0])} {value}")
        elif kind == "compfail" and len(parts) == 1:
            compfail.append(f"celery_saga_compensation_failures_total{_labels(name=parts[0])} {value}")
        elif kind == "dur" and len(parts) == 3 and parts[2].isdigit():
            buckets[(parts[0], parts[1])][int(parts[2])] = value
        elif kind == "dursum" and len(parts) == 2:
            sums[(parts[0], parts[1])] = value
    histogram = []
    for (name, status), counted in sorted(buckets.items()):
        running = 0
        for i, le in enumerate([*map(str, DURATION_BUCKETS), "+Inf"], start=1):
            running += counted.get(i, 0)
            histogram.append(f"celery_saga_duration_seconds_bucket{_labels(name=name, status=status, le=le)} {running}")
        histogram.append(
            f"celery_saga_duration_seconds_sum{_labels(name=name, status=status)} {sums.get((name, status), 0) / 1000}"
        )
        histogram.append(f"celery_saga_duration_seconds_count{_labels(name=name, status=status)} {running}")
    failed = [
        f"celery_saga_failed{_labels(name=name)} {row.get(SagaStatus.FAILED.value, 0)}"
        for name, row in sorted(counts.items())
    ]
    in_flight = [
        f"celery_saga_in_flight{_labels(status=st.value)} {sum(row.get(st.value, 0) for row in counts.values())}"
        for st in _IN_FLIGHT
    ]
    lines = [
        *_family("celery_saga_started_total", "counter", "Sagas started, by saga name.", started),
        *_family(
            "celery_saga_finished_total", "counter", "Sagas that ended, by saga name, status and reason.", finished
        ),
        *_family(
            "celery_saga_compensation_failures_total",
            "counter",
            "Compensation attempts that failed or missed their deadline, by saga name.",
            compfail,
        ),
        *_family(
            "celery_saga_steps_lost_total",
            "counter",
            "Running steps whose outcome was lost, by cause: worker (a lost pool child, or a worker declared "
            "lost for writing no liveness) or heartbeat (no heartbeat within its heartbeat_timeout).",
            lost,
        ),
        *_family(
            "celery_saga_rejected_messages_total",
            "counter",
            "Saga messages that changed nothing: their headers, record or plan did not bear them out, by reason.",
            rejected,
        ),
        *_family("celery_saga_in_flight", "gauge", "Sagas not finished, by status.", in_flight),
        *_family(
            "celery_saga_failed",
            "gauge",
            "FAILED sagas kept (the dead-letter list: a rollback that gave up), by saga name.",
            failed,
        ),
        *_family(
            "celery_saga_duration_seconds",
            "histogram",
            "Seconds from a saga's start to its end, by saga name and final status.",
            histogram,
        ),
        *_lock_families(store.lock_counters()),
    ]
    return "\n".join(lines) + "\n"


def _lock_families(counters: dict[str, int]) -> list[str]:
    """The locks' metrics (store/keys.py ``{locks}:m``): sagas waiting now, how long waits lasted, unlocks."""
    waiting = [
        f"celery_saga_waiting{_labels(name=field.partition(':')[2])} {max(value, 0)}"
        for field, value in sorted(counters.items())
        if field.startswith("waiting:")
    ]
    histogram, running = [], 0
    for i, le in enumerate([*map(str, DURATION_BUCKETS), "+Inf"], start=1):
        running += counters.get(f"wait:{i}", 0)
        histogram.append(f"celery_saga_lock_wait_seconds_bucket{_labels(le=le)} {running}")
    histogram.append(f"celery_saga_lock_wait_seconds_sum {counters.get('waitsum', 0) / 1000}")
    histogram.append(f"celery_saga_lock_wait_seconds_count {running}")
    return [
        *_family("celery_saga_waiting", "gauge", "Sagas waiting for their locks or running limit, by name.", waiting),
        *_family(
            "celery_saga_lock_wait_seconds",
            "histogram",
            "Seconds sagas waited for their locks or running limit, until they started or gave up.",
            histogram,
        ),
        *_family(
            "celery_saga_unlocked_total",
            "counter",
            "Locks of FAILED sagas given back by an operator (celery saga unlock).",
            [f"celery_saga_unlocked_total {counters.get('unlocked', 0)}"],
        ),
    ]
