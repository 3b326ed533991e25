"""The Celery app the three services share, configured from the environment.

Each service's tasks are routed to its own queue, and each service runs its
own worker (see README.md). ``REDIS_URL`` points at the broker, the result
backend and the saga store.
"""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("SAGA_DEMO_PREFIX", "shop")

app = Celery("shop", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    saga_redis_url=REDIS_URL,
    saga_key_prefix=PREFIX,
    saga_compensation_retry_backoff=0.2,
    saga_forward_retry_backoff=0.2,
    task_routes={
        "inventory.*": {"queue": "inventory"},
        "payments.*": {"queue": "payments"},
        "shipping.*": {"queue": "shipping"},
    },
    # Every queue name gets the demo's prefix, so the demo never mixes with other users of this Redis.
    broker_transport_options={"global_keyprefix": f"{PREFIX}:kombu:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:results:"},
    worker_send_task_events=True,
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    task_allow_error_cb_on_chord_header=False,
    result_expires=3600,
)
