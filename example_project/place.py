"""Place one order: ``python -m example_project.place happy|declined|undeliverable``."""

from __future__ import annotations

import sys
import uuid

from celery_saga import SagaCompensated, SagaFailed
from celery_saga.timeline import render

from .demo import ORDERS
from .orders import place_order

KINDS = {"happy": 0, "declined": 1, "undeliverable": 2}


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in KINDS:
        print(f"usage: python -m example_project.place {'|'.join(KINDS)}", file=sys.stderr)
        return 2
    label, order = ORDERS[KINDS[argv[0]]]
    res = place_order.apply_async(kwargs=order, idempotency_key=f"{argv[0]}-{uuid.uuid4().hex[:8]}")
    print(f"{label}: saga {res.id}")
    try:
        res.get(timeout=60)
    except (SagaCompensated, SagaFailed) as exc:
        print(f"rolled back: {exc}")
    print(render(res.state()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
