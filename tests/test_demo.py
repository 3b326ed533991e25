"""`make demo` end to end, in subprocesses: a full run, and a run cut short by Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REDIS_URL", None)  # the demo starts its own Redis
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_demo_runs_orders_to_completed_and_compensated_and_stops_everything() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "ended COMPLETED" in text and text.count("ended COMPENSATED") == 2
    assert "compensation  COMPENSATED" in text  # the timeline has compensation rows
    assert "Traceback" not in out.stdout + out.stderr
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    assert len(pids) == 4  # Redis and three workers
    assert not [p for p in pids if _alive(p)]
    assert text.index("Stopped the shipping worker") < text.index("Stopped the private Redis")


def test_demo_interrupted_with_ctrl_c_cleans_up_without_a_traceback() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "example_project.demo"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        lines.append(line)
        if "All workers are ready" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    assert proc.returncode == 0, text
    assert "Interrupted." in text and "Traceback" not in text
    assert "Stopped the private Redis" in text
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
    assert len(pids) == 4
    assert not [p for p in pids if _alive(p)]
