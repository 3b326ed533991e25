"""The README's code runs as written: its two app examples, copied into files, with a real worker.

Only the Redis URL changes, to a private server: the README points at
localhost:6379/0, which may be someone else's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_saga.redis_server import RedisServer
from tests.subprocs import ROOT, Subprocs, running

README = (ROOT / "README.md").read_text()


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of the README section with this heading."""
    start = README.index(f"## {section}\n")
    end = README.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", README[start : end if end != -1 else None], re.S)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def _run(module: str, code: str, server: RedisServer, tmp_path: Path, client: str) -> str:
    (tmp_path / f"{module}.py").write_text(code.replace("redis://localhost:6379/0", server.url))
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}", "PYTHONUNBUFFERED": "1"}
    procs = Subprocs(tmp_path)
    with running(procs):
        procs.celery("worker", ["worker", "-P", "threads", "-c", "2", "-l", "INFO"], env, app=module)
        out = subprocess.run(
            [sys.executable, "-c", client], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90
        )
        assert out.returncode == 0, out.stdout + out.stderr + procs.logs()
    return out.stdout


def test_add_sagas_to_an_existing_app_runs_as_written(server: RedisServer, tmp_path: Path) -> None:
    # A front-page section: read at a glance (issue 14 asked for under 60 lines).
    start = README.index("## Add sagas to an existing app\n")
    assert README[start : README.index("\n## ", start + 1)].count("\n") < 60
    (plain,) = python_blocks("Add sagas to an existing app")
    (django,) = python_blocks("Django and `@shared_task`")
    assert "shared_task" in django and "shared_task" not in plain
    # The command the README gives, as written.
    command = re.search(r'`python -c "(.*?)"`', README)
    assert command is not None
    out = _run("shop", plain, server, tmp_path, command[1])
    assert "'charge_id': 'ch-1'" in out and "'reservation_id': 'r-1'" in out


def test_the_usage_example_runs_as_written(server: RedisServer, tmp_path: Path) -> None:
    usage, _ = python_blocks("Usage")
    command = re.search(r'# python -c "(.*?)"', usage)
    assert command is not None
    out = _run("usage", usage, server, tmp_path, command[1])
    lines = out.strip().splitlines()
    assert lines[-3].endswith("'charge_id': 'ch-1'}") and "'currency'" not in lines[-3]
    assert lines[-2:] == ["False", "COMPLETED"]


def test_the_saga_shapes_example_runs_as_written(server: RedisServer, tmp_path: Path) -> None:
    _, shapes = python_blocks("Usage")
    command = re.search(r'# python -c "(.*?)"', shapes)
    assert command is not None
    out = _run("shapes", shapes, server, tmp_path, command[1])
    assert out.strip().splitlines()[-3:] == ["True", "ch-1 True", "h-1"]
