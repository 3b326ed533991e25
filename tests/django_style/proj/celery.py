"""The project's Celery app, configured from the environment like a settings module would."""

from __future__ import annotations

import os

from celery import Celery

REDIS_URL = os.environ.get("DJ_REDIS_URL", "redis://127.0.0.1:6379/9")
PREFIX = os.environ.get("DJ_PREFIX", "djtest")
QUEUE = os.environ.get("DJ_QUEUE", "dj")

app = Celery("proj")
app.conf.update(
    broker_url=REDIS_URL,
    result_backend=REDIS_URL,
    broker_transport_options={"global_keyprefix": f"{PREFIX}:kombu:"},
    result_backend_transport_options={"global_keyprefix": f"{PREFIX}:results:"},
    task_default_queue=QUEUE,
    saga_key_prefix=PREFIX,
    saga_compensation_retry_backoff=0.05,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
# As Django projects do: the tasks modules of the listed packages are imported by autodiscovery.
app.autodiscover_tasks(["tests.django_style.shop"])
