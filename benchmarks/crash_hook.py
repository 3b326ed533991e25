"""The crash-point hook's cost: sagas on a worker without it against a worker with it armed, side by side.

The step wrapper checks ``_crash_hook is not None`` at four points of every
step and compensation message (see ``celery_saga.testing.crash``); only the
explorer's workers set it. Measured here is an upper bound of what the off
hook costs: the same batches of the ``real`` saga (``benchmarks/bench_app.py``)
on the explorer's ``crash_worker`` with no crash point (hook off, as in
production) and armed for a saga that never runs, whose hook is called at
every point and compares its target each time: strictly more work than the
None check. Rounds alternate the two, restarting the worker for
each batch. Printed: each round's ratios and their medians (armed/off
throughput and worker CPU per saga: 1.00 means nothing measurable), then the
off check timed alone against the worker CPU of a saga. A script, not a
timed test.

Usage: ``python benchmarks/crash_hook.py [--n 200] [--rounds 6]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.overhead import Runner, Worker, bench_run, wait_ready  # noqa: E402
from celery_saga.worker import wrapper  # noqa: E402


def command(url: str, prefix: str, armed: bool) -> list[str]:
    """The explorer's worker; armed, to die at point 3 of a step of a saga id no run uses."""
    crash = {
        "saga_id": "no-such-saga",
        "step": "bench.charge",
        "compensating": False,
        "point": 3,
        "gate_url": url,
        "gate_key": f"{prefix}:gate",
    }
    spec = {"app": "benchmarks.bench_app", "settings": {}, "crash": crash if armed else None}
    return [sys.executable, "-m", "celery_saga.testing.crash_worker", json.dumps(spec)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=200, help="sagas per batch (default 200)")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of one batch on each worker (default 6)")
    args = parser.parse_args(argv)
    with bench_run("bench-crash-hook") as b:
        url, ns, bench, client, log_path = b.url, b.ns, b.bench, b.client, b.log_path
        rates: dict[str, list[float]] = {"off": [], "armed": []}
        # Worker CPU (main process and pool) per saga, ms: steadier than throughput on a shared machine.
        cpu: dict[str, list[float]] = {"off": [], "armed": []}
        try:
            for r in range(args.rounds):
                # Alternate which goes first, so drift in the machine's load hits both.
                order = ("off", "armed") if r % 2 == 0 else ("armed", "off")
                for which in order:
                    worker = Worker(b.env, b.queue, log_path, command(url, b.prefix, armed=which == "armed"))
                    try:
                        wait_ready(bench, worker, f"{ns}-{r}-{which}")
                        runner = Runner(bench, client, ns, worker.proc.pid)
                        runner.batch("saga:real", 100)  # warm up: connections, caches, the definition
                        batch = runner.batch("saga:real", args.n)
                        rates[which].append(batch.rate)
                        cpu[which].append(1000 * sum(batch.cpu[k] or 0.0 for k in ("worker main", "pool")) / args.n)
                    finally:
                        worker.stop()
                print(
                    f"  round {r + 1}: off {rates['off'][-1]:6.1f}/s {cpu['off'][-1]:.2f} ms CPU   "
                    f"armed {rates['armed'][-1]:6.1f}/s {cpu['armed'][-1]:.2f} ms CPU   "
                    f"({rates['armed'][-1] / rates['off'][-1]:.3f})"
                )
            for what, series in (("throughput", rates), ("worker CPU per saga", cpu)):
                ratios = [a / o for a, o in zip(series["armed"], series["off"], strict=True)]
                print(
                    f"armed/off {what}, real workload: median {statistics.median(ratios):.3f} "
                    f"(rounds {min(ratios):.3f}-{max(ratios):.3f})"
                )
            # What the off hook is, timed alone: the wrapper's own check, in its own globals.
            check = timeit.timeit("if _crash_hook is not None: pass", globals=vars(wrapper), number=1_000_000)
            per_saga_ns = check * 1000 * 4 * 3  # ns: 4 points per message, 3 step messages per saga
            off_cpu_ns = statistics.median(cpu["off"]) * 1e6
            print(
                f"the off hook, timed alone: {check * 1000:.1f} ns per check, {per_saga_ns:.0f} ns per saga "
                f"(4 points x 3 steps) = {per_saga_ns / off_cpu_ns:.5%} of the worker CPU per saga"
            )
        finally:
            if os.path.exists(log_path):
                os.unlink(log_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
