"""Place one order, or confirm a waiting payment.

``python -m example_project.place happy|declined|slow|unconfirmed|undeliverable|big``
places an order of that kind (see ``demo.ORDERS``), waits for its saga to end,
and for the late outcome of any step it stopped waiting for, then prints its
timeline and what the services did.

``python -m example_project.place confirm SAGA_ID`` is the customer confirming
the payment of an ``unconfirmed`` order: the charge goes through, even if the
order was cancelled meanwhile, in which case a second compensation round refunds it.
"""

from __future__ import annotations

import sys
import time
import uuid

from celery_saga import SagaCompensated, SagaFailed
from celery_saga.views import render_timeline

from . import ledger
from .demo import GATES, ORDERS, effects_left, journal_lines, saga_of, step_notes, unsettled
from .payments import CONFIRM_WAIT
from .shipping import CARRIER_DELAY

USAGE = (
    f"usage: python -m example_project.place {'|'.join(ORDERS)}\n       python -m example_project.place confirm SAGA_ID"
)

#: How long the gated steps may take to end late, seconds.
LATE_WITHIN = {"shipping.ship_order": CARRIER_DELAY, "payments.charge_card": CONFIRM_WAIT}

HINTS = {
    "big": (
        "It waits for a manager's approval. In another terminal:\n"
        '  celery -A example_project.app saga signal {id} approval --data \'{{"approved_by": "you"}}\'\n'
        "  celery -A example_project.app saga signal {id} rejected   # rolls it back, reason rejected"
    ),
    "slow": f"The carrier hangs for {CARRIER_DELAY:g}s; the saga stops waiting for it after the shipping deadline.",
    "unconfirmed": (
        f"The payment waits up to {CONFIRM_WAIT:g}s for the customer to confirm it. Meanwhile, in another terminal:\n"
        "  celery -A example_project.app saga cancel {id}       # the shop gives up: COMPENSATED, reason cancelled\n"
        "  python -m example_project.place confirm {id}         # the customer confirms"
    ),
}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "confirm":
        step, answer = GATES["unconfirmed"]
        ledger.open_gate(f"{argv[1]}:{step}", answer)
        print(f"saga {argv[1]}: the customer confirmed the payment")
        return 0
    if len(argv) != 1 or argv[0] not in ORDERS:
        print(USAGE, file=sys.stderr)
        return 2
    label, order = ORDERS[argv[0]]
    res = saga_of(argv[0]).apply_async(kwargs=order, idempotency_key=f"{argv[0]}-{uuid.uuid4().hex[:8]}")
    print(f"{label}: saga {res.id}")
    if argv[0] in HINTS:
        print(HINTS[argv[0]].format(id=res.id))
    try:
        res.get(timeout=60)
    except (SagaCompensated, SagaFailed) as exc:
        print(f"rolled back: {exc}")
    state = res.state()
    if unsettled(state):
        wait = max(LATE_WITHIN.get(name, 10.0) for name in unsettled(state)) + 5
        print(f"waiting up to {wait:g}s for the late outcome of {', '.join(unsettled(state))} (Ctrl-C stops waiting)")
        deadline = time.monotonic() + wait
        try:
            while unsettled(state) and time.monotonic() < deadline:
                time.sleep(0.2)
                state = res.state()
        except KeyboardInterrupt:
            pass
    print(render_timeline(state))
    for line in step_notes(state):
        print(line)
    print("what the services did:")
    for line in journal_lines(state):
        print(f"  {line}")
    print(f"effects left in the services: {effects_left(res.id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
