"""Sagas under Celery's message signing: every message a saga sends is signed, and an unsigned one is refused.

docs/security.md tells how to run sagas with ``task_serializer = "auth"``;
this runs a whole saga that completes and one that is compensated, with a
self-signed certificate made here, a real ``celery worker`` and a client,
each a process of its own (``setup_security`` changes kombu's serializers
for a whole process).
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from celery_saga.redis_server import RedisServer
from tests.helpers import patience, wait_for
from tests.subprocs import ROOT, Subprocs, running, worker_args

x509 = pytest.importorskip("cryptography.x509")


def _self_signed(folder: Path) -> None:
    """``key.pem`` and ``cert.pem``: an RSA key and a certificate it signed itself, trusted (``store/``)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "celery-saga-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "store").mkdir()
    (folder / "store" / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


CLIENT = """
import json
from celery_saga import SagaCompensated
from tests.signed_app import order
done = order.delay(order_id=1).get(timeout={timeout})
try:
    order.delay(order_id=2, fail=True).get(timeout={timeout})
except SagaCompensated as exc:
    print(json.dumps([done, exc.step, exc.reason]))
"""


def test_a_saga_and_its_compensations_run_with_signed_messages(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    _self_signed(certs)
    prefix = f"signed-{uuid.uuid4().hex[:8]}"
    with RedisServer() as server:
        env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "SIGNED_REDIS": server.url}
        env.update(SIGNED_PREFIX=prefix, SIGNED_CERTS=str(certs), PYTHONPATH=str(ROOT))
        procs = Subprocs(tmp_path)
        with running(procs):
            # Given a worker that accepts only signed messages
            procs.celery("worker", worker_args(f"{prefix}-q", f"signed-{prefix}@%h"), env, app="tests.signed_app")

            # When a client, signing too, runs a saga that completes and one that is compensated
            out = subprocess.run(
                [sys.executable, "-c", CLIENT.format(timeout=patience(60))],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=patience(120),
            )
            assert out.returncode == 0, out.stdout + out.stderr + procs.logs()

            # Then both ended as they should: every step, next stage and compensation was a signed message
            done, failed_step, reason = json.loads(out.stdout.strip().splitlines()[-1])
            assert done["tracking"] == "t-1"
            assert (failed_step, reason) == ("signed.ship", "failure")
            client = redis.Redis.from_url(server.url)
            ledger = [json.loads(x) for x in client.lrange(f"{prefix}:ledger", 0, -1)]
            assert [e for e in ledger if e[2] == 2] == [
                ["do", "signed.reserve", 2],
                ["do", "signed.charge", 2],
                ["undo", "signed.charge", 2],
                ["undo", "signed.reserve", 2],
            ]

            # And an unsigned message, a forged step of the first saga, is refused before any code sees it
            queue = f"{prefix}:kombu:{prefix}-q"
            forged = {
                "body": "W1tdLCB7fSwge31d",  # [[], {}, {}] in base64, as kombu's Redis transport sends
                "content-encoding": "utf-8",
                "content-type": "application/json",
                "headers": {"task": "signed.ship", "id": "forged", "saga_id": "x"},
                "properties": {
                    "delivery_tag": "forged",
                    "body_encoding": "base64",
                    "delivery_info": {"exchange": "", "routing_key": f"{prefix}-q"},
                    "priority": 0,
                },
            }
            client.lpush(queue, json.dumps(forged))
            refused = "Refusing to deserialize untrusted content of type json"
            wait_for(lambda: refused in procs.logs() and client.llen(queue) == 0, 30, "the worker to refuse it")
            assert len(client.lrange(f"{prefix}:ledger", 0, -1)) == len(ledger)
