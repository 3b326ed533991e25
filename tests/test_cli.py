"""``celery -A tests.cli_app saga ...`` as real subprocesses, against sagas in every status.

The sagas run on an in-process worker in the test process (see
``tests.cli_app.every_state``), or on none at all (``tests.cli_app.idle``:
their steps wait in the queue); the CLI subprocess is pointed at the same
Redis and prefix through environment variables. Every run checks that
nothing printed a traceback.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import signals

from celery_saga import SagaStatus
from celery_saga.cli import parse_since
from celery_saga.redis_server import RedisServer, free_port
from celery_saga.store.keys import Keys
from celery_saga.testing import thread_worker
from tests import cli_app
from tests.cli_app import HASTY_TIMEOUT, STATES, cli_env
from tests.helpers import patience, store_now, wait_for
from tests.subprocs import Subprocs, running

ROOT = Path(__file__).resolve().parent.parent
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
SUMMARY_KEYS = ["id", "name", "status", "status_at", "created_at", "failed_step", "error"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def cli_many(env: dict[str, str], calls: Sequence[Sequence[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Independent read-only runs, concurrently: each subprocess mostly waits for imports."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: cli(env, *args), calls))


def listed(proc: subprocess.CompletedProcess[str]) -> list[dict[str, str | None]]:
    assert proc.returncode == 0, proc.stderr
    sagas: list[dict[str, str | None]] = json.loads(proc.stdout)["sagas"]
    return sagas


fresh, world = cli_app.world_fixtures("sagacli")
COMMANDS = (
    "list",
    "show",
    "stats",
    "retry",
    "rerun",
    "signal",
    "purge",
    "cancel",
    "locks",
    "unlock",
    "sweep",
    "check",
    "web",
)


@pytest.fixture
def idle(redis_url: str) -> Iterator[SimpleNamespace]:
    """The app side with no worker: nothing runs the steps, nothing sweeps their deadlines."""
    with cli_app.idle(redis_url, f"sagacli-{uuid.uuid4().hex[:10]}") as w:
        yield w


def shown(env: dict[str, str], saga_id: str) -> dict[str, Any]:
    proc = cli(env, "show", saga_id, "--json")
    assert proc.returncode == 0, proc.stderr
    record: dict[str, Any] = json.loads(proc.stdout)
    return record


def step_of(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in record["steps"] if s["name"] == name)


def queued_ids(client: Any, prefix: str, queue: str) -> list[str]:
    """Task ids of the messages waiting in ``queue`` (kombu's list, under the prefix)."""
    return [json.loads(m)["headers"]["id"] for m in client.lrange(f"{prefix}:kombu:{queue}", 0, -1)]


def test_list_every_state(world) -> None:
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    runs = cli_many(
        world.env,
        [
            ["list", "--json"],
            ["list"],
            *[["list", "--status", s, "--json"] for s in STATES],
            ["list", "--status", "failed", "--json"],
            ["list", "--name", "cli_refund", "--json"],
            ["list", "--limit", "1", "--json"],
            ["list", "--since", "10m", "--json"],
            ["list", "--since", future, "--json"],
            ["list", "--since", future],
        ],
    )
    everything, text, by_status, lower, refund, one, recent, none_json, none_text = (
        runs[0],
        runs[1],
        runs[2:8],
        runs[8],
        runs[9],
        runs[10],
        runs[11],
        runs[12],
        runs[13],
    )
    # All statuses, newest first, in the documented shape.
    sagas = listed(everything)
    assert {s["id"]: s["status"] for s in sagas} == {**{world.ids[s]: s for s in STATES}, world.refund.id: "COMPLETED"}
    assert all(list(s) == SUMMARY_KEYS for s in sagas)
    assert all(ISO.match(str(s["status_at"])) and ISO.match(str(s["created_at"])) for s in sagas)
    times = [s["status_at"] for s in sagas]
    assert times == sorted(times, reverse=True)
    failed = next(s for s in sagas if s["id"] == world.ids["FAILED"])
    assert (failed["name"], failed["failed_step"], failed["error"]) == (
        "cli_order",
        "cli.charge",
        "RuntimeError: charge declined",
    )
    # The table has a row per saga.
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["id", "name", "status", "since", "failed", "step", "error"]
    for saga_id in [*world.ids.values(), world.refund.id]:
        assert saga_id in text.stdout
    # Filters.
    for status, proc in zip(STATES, by_status, strict=True):
        expected = {world.ids[status]} | ({world.refund.id} if status == "COMPLETED" else set())
        assert {s["id"] for s in listed(proc)} == expected
        assert {s["status"] for s in listed(proc)} == {status}
    assert [s["id"] for s in listed(lower)] == [world.ids["FAILED"]]
    assert [s["id"] for s in listed(refund)] == [world.refund.id]
    assert listed(one) == sagas[:1]
    assert len(listed(recent)) == len(sagas)
    assert listed(none_json) == []
    assert none_text.returncode == 0 and "no sagas found" in none_text.stdout


def test_show_every_state(world) -> None:
    calls = [[verb, world.ids[s], *flag] for s in STATES for verb, flag in (("show", []), ("show", ["--json"]))]
    runs = iter(cli_many(world.env, calls))
    shown = {}
    for status in STATES:
        text, as_json = next(runs), next(runs)
        assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
        assert f"saga {world.ids[status]} (cli_order): {status} since " in text.stdout
        assert re.search(r"^step\s+action\s+status\s+tries\s+started\s+ended\s+error$", text.stdout, re.M)
        undone = status in ("COMPENSATING", "COMPENSATED", "FAILED")
        assert re.search(r"^cli\.reserve\s+compensation\s", text.stdout, re.M) if undone else True
        shown[status] = json.loads(as_json.stdout)
        assert shown[status]["id"] == world.ids[status] and shown[status]["status"] == status

    def steps(status: str) -> list[tuple[str, str | None]]:
        return [(s["status"], s["compensation"] and s["compensation"]["status"]) for s in shown[status]["steps"]]

    assert steps("PENDING") == [("DISPATCHED", None), ("WAITING", None), ("WAITING", None)]
    assert steps("RUNNING") == [("COMPLETED", None), ("RUNNING", None), ("WAITING", None)]
    # Both compensations fail forever: each is between attempts (RETRYING), or in one (RUNNING) as show reads it.
    retrying = [(s, c if c != "RUNNING" else "RETRYING") for s, c in steps("COMPENSATING")]
    assert retrying == [("COMPLETED", "RETRYING"), ("COMPLETED", "RETRYING"), ("FAILED", None)]
    assert steps("COMPLETED") == [("COMPLETED", None), ("COMPLETED", None), ("COMPLETED", None)]
    assert steps("COMPENSATED") == [("COMPLETED", "COMPENSATED"), ("FAILED", None), ("WAITING", None)]
    assert steps("FAILED") == [("COMPLETED", "GAVE_UP"), ("FAILED", None), ("WAITING", None)]
    gave_up = shown["FAILED"]["steps"][0]
    assert gave_up["result"] == {"reservation": f"r-{world.tokens['FAILED']}"}
    assert gave_up["attempts"] == 1 and ISO.match(gave_up["started_at"]) and ISO.match(gave_up["ended_at"])
    assert gave_up["compensation"]["attempts"] == 1
    assert gave_up["compensation"]["error"] == "RuntimeError: refund of cli.reserve is down"
    assert ISO.match(gave_up["compensation"]["started_at"]) and ISO.match(gave_up["compensation"]["ended_at"])
    assert shown["FAILED"]["steps"][1]["error"] == "RuntimeError: charge declined"
    assert shown["COMPLETED"]["data"]["payment"] == f"p-r-{world.tokens['COMPLETED']}"
    assert shown["COMPENSATING"]["steps"][0]["compensation"]["attempts"] >= 2


def test_stats(world) -> None:
    as_json, text = cli_many(world.env, [["stats", "--json"], ["stats"]])
    assert as_json.returncode == 0 and text.returncode == 0
    assert json.loads(as_json.stdout) == {
        "by_status": {s: 2 if s == "COMPLETED" else 1 for s in STATES},
        "by_name": {
            "cli_order": {s: 1 for s in STATES},
            "cli_refund": {s: 1 if s == "COMPLETED" else 0 for s in STATES},
        },
    }
    assert re.search(r"^COMPLETED\s+2$", text.stdout, re.M)
    assert re.search(r"^cli_refund\s+0\s+0\s+0\s+1\s+0\s+0$", text.stdout, re.M)


def test_not_found_and_not_allowed_exit_1(world) -> None:
    not_failed = ("PENDING", "RUNNING", "COMPENSATING", "COMPLETED", "COMPENSATED")
    running = ("PENDING", "RUNNING", "COMPENSATING")
    calls = [
        *[["retry", world.ids[s]] for s in not_failed],
        *[["purge", world.ids[s]] for s in running],
        ["show", "no-such-saga"],
        ["show", "no-such-saga", "--json"],
        ["retry", "no-such-saga"],
        ["purge", "no-such-saga"],
    ]
    runs = cli_many(world.env, calls)
    for status, proc in zip(not_failed, runs[:5], strict=True):
        assert proc.returncode == 1 and proc.stdout == ""
        assert f"cannot retry saga {world.ids[status]}: it is {status}" in proc.stderr
    for status, proc in zip(running, runs[5:8], strict=True):
        assert proc.returncode == 1
        assert f"cannot purge saga {world.ids[status]}: it is {status}" in proc.stderr
    for proc in runs[8:]:
        assert proc.returncode == 1 and proc.stdout == ""
        assert "saga no-such-saga not found or expired" in proc.stderr
    # Nothing changed.
    assert {s["id"]: s["status"] for s in listed(cli(world.env, "list", "--json"))} == {
        **{world.ids[s]: s for s in STATES},
        world.refund.id: "COMPLETED",
    }


def test_usage_errors_exit_2(redis_url: str) -> None:
    env = cli_env(redis_url, f"sagacli-{uuid.uuid4().hex[:10]}", "q")
    runs = cli_many(
        env,
        [
            ["list", "--status", "BOGUS"],
            ["list", "--since", "yesterday"],
            ["list", "--limit", "0"],
            ["show"],
            ["retry"],
            ["cancel"],
            ["sweep", "--interval", "0"],
            ["sweep", "--interval", "soon"],
            ["frobnicate"],
        ],
    )
    for proc in runs:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip()
    assert "neither ISO-8601 nor a time ago" in runs[1].stderr
    assert "give a saga id, or filters for a bulk cancel" in runs[5].stderr
    assert all("--interval" in proc.stderr for proc in runs[6:8])


def test_parse_since() -> None:
    assert parse_since("10m") == timedelta(minutes=10)
    assert parse_since("2h") == timedelta(hours=2)
    assert parse_since("1d") == timedelta(days=1)
    assert parse_since("1.5s") == timedelta(seconds=1.5)
    assert parse_since("2026-11-27T03:25:09.640Z") == datetime(2026, 11, 27, 3, 25, 9, 640000, tzinfo=UTC)
    assert parse_since("2026-11-27T03:25") == datetime(2026, 11, 27, 3, 25, tzinfo=UTC)
    assert parse_since("2026-11-27T04:25+01:00") == datetime(2026, 11, 27, 3, 25, tzinfo=UTC)
    with pytest.raises(ValueError):
        parse_since("10 minutes")


def test_retry_turns_a_failed_saga_compensated(fresh) -> None:
    with fresh("FAILED") as w:
        saga_id, token = w.ids["FAILED"], w.tokens["FAILED"]
        assert w.shop.callbacks(saga_id) == ["failed"]

        # When the compensation is fixed and an operator retries the saga
        w.client.delete(f"{w.prefix}:broken:{token}")
        proc = cli(w.env, "retry", saga_id)

        # Then the compensation that gave up runs again and the saga ends COMPENSATED,
        # with on_failure sent again for the new outcome
        assert proc.returncode == 0, proc.stderr
        assert saga_id in proc.stdout
        wait_for(lambda: w.results["FAILED"].state().status is SagaStatus.COMPENSATED, what="the saga to compensate")
        wait_for(lambda: w.shop.callbacks(saga_id) == ["failed", "failed"], what="on_failure to be sent again")
        assert w.client.lrange(f"{w.prefix}:undone:{token}", 0, -1) == ["cli.reserve"]
        shown = json.loads(cli(w.env, "show", saga_id, "--json").stdout)
        assert shown["status"] == "COMPENSATED"
        compensation = shown["steps"][0]["compensation"]
        assert (compensation["status"], compensation["attempts"]) == ("COMPENSATED", 2)

        # And it cannot be retried again
        again = cli(w.env, "retry", saga_id)
        assert again.returncode == 1 and f"cannot retry saga {saga_id}: it is COMPENSATED" in again.stderr


def test_purge_removes_finished_sagas_and_refuses_running_ones(fresh) -> None:
    finished = ("COMPLETED", "COMPENSATED", "FAILED")
    with fresh("RUNNING", *finished) as w:
        purged = cli_many(w.env, [["purge", w.ids[s]] for s in finished])
        for status, proc in zip(finished, purged, strict=True):
            assert proc.returncode == 0, proc.stderr
            assert f"saga {w.ids[status]} purged" in proc.stdout
        refused = cli(w.env, "purge", w.ids["RUNNING"])
        assert refused.returncode == 1 and "it is RUNNING" in refused.stderr

        after = cli_many(
            w.env,
            [["list", "--json"], *[["show", w.ids[s]] for s in finished], *[["purge", w.ids[s]] for s in finished]],
        )
        assert {s["id"] for s in listed(after[0])} == {w.ids["RUNNING"], w.refund.id}
        for proc in after[1:]:
            assert proc.returncode == 1 and "not found or expired" in proc.stderr


def test_corrupt_record_is_reported_not_raised(world) -> None:
    keys = Keys(world.prefix)
    bad, wrong_type = f"corrupt-{uuid.uuid4().hex[:6]}", f"wrongtype-{uuid.uuid4().hex[:6]}"
    world.client.hset(keys.record(bad), mapping={"status": "COMPLETED", "name": "cli_order", "plan": "{"})
    world.client.zadd(keys.name_index(keys.shard_of(bad), "cli_order", "COMPLETED"), {bad: 1})
    world.client.sadd(keys.names(keys.shard_of(bad)), "cli_order")
    world.client.set(keys.record(wrong_type), "not a hash")
    show, show_json, show_wrong, listing = cli_many(
        world.env, [["show", bad], ["show", bad, "--json"], ["show", wrong_type], ["list", "--json"]]
    )
    for proc in (show, show_json):
        assert proc.returncode == 1 and proc.stdout == ""
        assert f"saga record {bad} is corrupt" in proc.stderr
    assert show_wrong.returncode == 1 and "WRONGTYPE" in show_wrong.stderr
    # Listed as far as it can be read, and purged like any finished saga.
    assert bad in {s["id"] for s in listed(listing)}
    assert cli(world.env, "purge", bad).returncode == 0
    assert not world.client.exists(keys.record(bad))


def test_store_unavailable_exits_69_without_the_password() -> None:
    env = cli_env(f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0", f"sagacli-{uuid.uuid4().hex[:10]}", "q")
    runs = cli_many(
        env,
        [
            ["list"],
            ["list", "--json"],
            ["show", "x"],
            ["stats"],
            ["retry", "x"],
            ["purge", "x"],
            ["cancel", "x"],
            ["sweep", "--once"],
            ["sweep"],
        ],
    )
    for proc in runs:
        assert proc.returncode == 69, proc.stderr
        assert "unreachable" in proc.stderr and "redis://:**@127.0.0.1" in proc.stderr
        assert "s3cret-pw" not in proc.stdout + proc.stderr


def test_password_protected_redis() -> None:
    password = f"pw-{uuid.uuid4().hex}"
    prefix = f"sagacli-{uuid.uuid4().hex[:10]}"
    with RedisServer(password=password) as server:
        # Given a saga waiting in a password-protected Redis (no worker: it stays PENDING)
        shop = cli_app.create(server.url, prefix, "q")
        try:
            saga_id = shop.order.delay(token="pw").id
        finally:
            shop.app.close()
            shop.client.close()

        # Then commands work with the password in the URL, and never print it
        env = cli_env(server.url, prefix, "q")
        listing, show, stats = cli_many(env, [["list", "--json"], ["show", saga_id], ["stats", "--json"]])
        assert [(s["id"], s["status"]) for s in listed(listing)] == [(saga_id, "PENDING")]
        assert show.returncode == 0 and "PENDING" in show.stdout
        assert json.loads(stats.stdout)["by_status"]["PENDING"] == 1
        refused = cli(env, "purge", saga_id)
        assert refused.returncode == 1 and "it is PENDING" in refused.stderr
        for proc in (listing, show, stats, refused):
            assert password not in proc.stdout + proc.stderr

        # And a wrong or missing password means the store is unavailable, masked
        wrong = cli_env(server.url.replace(password, "wrong-pw"), prefix, "q")
        missing = cli_env(server.url.replace(f":{password}@", ""), prefix, "q")
        for proc in cli_many(wrong, [["list"], ["show", saga_id]]) + cli_many(missing, [["stats"]]):
            assert proc.returncode == 69 and "unreachable" in proc.stderr and "AuthenticationError" in proc.stderr
            assert password not in proc.stdout + proc.stderr

    # When the server is gone
    gone = cli(env, "list")
    assert gone.returncode == 69 and "redis://:**@127.0.0.1" in gone.stderr
    assert password not in gone.stdout + gone.stderr


def test_help_lists_every_command(redis_url: str) -> None:
    env = cli_env(redis_url, f"sagacli-{uuid.uuid4().hex[:10]}", "q")
    group, sweep_help, cancel_help = cli_many(env, [["--help"], ["sweep", "--help"], ["cancel", "--help"]])
    assert group.returncode == 0, group.stderr
    assert f"Operate on sagas: {', '.join(COMMANDS)}." in " ".join(group.stdout.split())  # however click wraps it
    listed_commands = re.findall(r"^  (\w+)\s", group.stdout.split("Commands:", 1)[1], re.M)
    assert sorted(listed_commands) == sorted(COMMANDS)
    assert sweep_help.returncode == 0 and "--once" in sweep_help.stdout and "--interval" in sweep_help.stdout
    assert cancel_help.returncode == 0 and "SAGA_ID" in cancel_help.stdout


def test_cancel_refuses_finished_and_missing_sagas(world) -> None:
    finished = ("COMPLETED", "COMPENSATED", "FAILED")
    runs = cli_many(world.env, [*[["cancel", world.ids[s]] for s in finished], ["cancel", "no-such-saga"]])
    for status, proc in zip(finished, runs[:3], strict=True):
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        assert f"saga {world.ids[status]} had already finished" in proc.stderr
    missing = runs[3]
    assert missing.returncode == 1 and missing.stdout == ""
    assert "saga no-such-saga not found or expired" in missing.stderr
    # Nothing changed, and no callback was sent again.
    assert {s["id"]: s["status"] for s in listed(cli(world.env, "list", "--json"))} == {
        **{world.ids[s]: s for s in STATES},
        world.refund.id: "COMPLETED",
    }
    assert world.shop.callbacks(world.ids["FAILED"]) == ["failed"]
    assert world.shop.callbacks(world.ids["COMPENSATED"]) == ["failed"]


def test_cancel_a_running_saga_compensates_the_running_step_blind(fresh) -> None:
    with fresh("RUNNING") as w:
        saga_id, token = w.ids["RUNNING"], w.tokens["RUNNING"]
        # Given the saga's second step is running (held on its gate)

        # When an operator cancels it
        proc = cli(w.env, "cancel", saga_id)

        # Then it is rolled back: the running step's outcome is unknown, so it
        # is compensated blind (step_result=None) before the step that completed
        assert proc.returncode == 0, proc.stderr
        assert f"saga {saga_id} cancelled" in proc.stdout
        assert f"`celery -A tests.cli_app saga show {saga_id}`" in proc.stdout  # a hint to copy and run
        wait_for(lambda: w.results["RUNNING"].state().status is SagaStatus.COMPENSATED, what="the saga to compensate")
        record = shown(w.env, saga_id)
        assert (record["status"], record["reason"], record["failed_step"]) == ("COMPENSATED", "cancelled", "cli.charge")
        assert [(s["status"], s["compensation"] and s["compensation"]["status"]) for s in record["steps"]] == [
            ("COMPLETED", "COMPENSATED"),
            ("UNKNOWN", "COMPENSATED"),
            ("WAITING", None),
        ]
        assert w.shop.undo_log(token) == [
            ["cli.charge", 1, False, None],
            ["cli.reserve", 1, True, {"reservation": f"r-{token}"}],
        ]
        wait_for(lambda: w.shop.callbacks(saga_id) == ["failed"], what="on_failure")
        assert saga_id in {s["id"] for s in listed(cli(w.env, "list", "--status", "COMPENSATED", "--json"))}

        # When the held step then succeeds after all
        w.shop.gates.open(token)

        # Then its real result is compensated in a second round; the saga stays COMPENSATED
        wait_for(lambda: len(w.shop.undo_log(token)) == 3, what="the second compensation round")
        assert w.shop.undo_log(token)[2] == ["cli.charge", 2, True, {"payment": f"p-r-{token}"}]
        state = w.results["RUNNING"].state()
        assert state.status is SagaStatus.COMPENSATED
        assert state.step("cli.charge").stopped_by == "cancelled"
        assert w.shop.callbacks(saga_id) == ["failed"]

        # And it cannot be cancelled again
        again = cli(w.env, "cancel", saga_id)
        assert again.returncode == 1 and "had already finished" in again.stderr


def test_cancel_fences_a_step_still_queued(idle) -> None:
    # Given a saga whose first step waits in the queue: no worker runs (PENDING)
    res = idle.shop.order.apply_async(kwargs={"token": "queued", "hold": "reserve"})
    assert res.status is SagaStatus.PENDING

    # When an operator cancels it
    proc = cli(idle.env, "cancel", res.id)

    # Then it ends at once: nothing ran, so nothing is compensated
    assert proc.returncode == 0, proc.stderr
    record = shown(idle.env, res.id)
    assert (record["status"], record["reason"]) == ("COMPENSATED", "cancelled")
    reserve = step_of(record, "cli.reserve")
    assert (reserve["status"], reserve["attempts"], reserve["compensation"]["status"]) == ("CANCELLED", 0, None)

    # And when a worker receives the queued message later, the step does not run
    handled = threading.Event()

    def on_postrun(task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        if task_id == f"{res.id}:cli.reserve" and state == "IGNORED":
            handled.set()

    signals.task_postrun.connect(on_postrun, weak=False)
    try:
        with thread_worker(idle.shop.app, concurrency=2):
            wait_for(handled.is_set, what="the worker to skip the fenced message")
    finally:
        signals.task_postrun.disconnect(on_postrun)
        idle.shop.gates.open("queued")
    assert idle.shop.gates.entered("queued") == []
    after = res.state().step("cli.reserve")
    assert (after.status.value, after.attempts, after.compensation_status) == ("CANCELLED", 0, None)


def test_sweep_once_times_out_a_step_nobody_ran(idle) -> None:
    # Given a saga whose first step has a short deadline, and no worker to run or sweep it
    res = idle.shop.hasty.apply_async(kwargs={"token": "hasty"}, on_failure=idle.shop.notify.s("failed"))
    deadline = res.state().step("cli.reserve").deadline
    assert deadline is not None
    wait_for(lambda: store_now(idle.client) > deadline.timestamp() + 0.05, 5, "the step's deadline to pass")
    assert res.status is SagaStatus.PENDING  # nothing acts on a deadline by itself

    # When an operator sweeps once
    proc = cli(idle.env, "sweep", "--once")

    # Then the step that never started is fenced and the saga rolled back, with on_failure sent
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "claimed 1, acted on 1, errors 0"
    record = shown(idle.env, res.id)
    assert (record["status"], record["reason"], record["failed_step"]) == ("COMPENSATED", "timeout", "cli.reserve")
    assert record["error"].startswith(f"timeout: step cli.reserve had no outcome {HASTY_TIMEOUT:g}s after")
    reserve = step_of(record, "cli.reserve")
    assert (reserve["status"], reserve["attempts"], reserve["compensation"]["status"]) == ("CANCELLED", 0, None)
    assert res.state().step("cli.reserve").timed_out
    assert queued_ids(idle.client, idle.prefix, idle.queue).count(f"{res.id}:on_failure") == 1

    # And the finished saga left the deadline index: the next sweep finds nothing
    again = cli(idle.env, "sweep", "--once")
    assert again.returncode == 0 and again.stdout.strip() == "claimed 0, acted on 0, errors 0"
    assert queued_ids(idle.client, idle.prefix, idle.queue).count(f"{res.id}:on_failure") == 1


def test_sweep_runs_until_interrupted(idle, tmp_path: Path) -> None:
    # Given a standalone sweeper
    log_path = tmp_path / "sweep.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", "sweep", "--interval", "0.1"],
            env=idle.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "Ctrl-C to stop" in log_path.read_text(), 30, "the sweeper to start")
        assert proc.poll() is None

        # When a step's deadline passes with no worker
        res = idle.shop.hasty.delay(token="swept")

        # Then the sweeper rolls the saga back, shortly after the deadline
        wait_for(lambda: res.status is SagaStatus.COMPENSATED, 10, "the sweeper to act on the deadline")
        state = res.state()
        assert state.reason == "timeout" and state.step("cli.reserve").status.value == "CANCELLED"

        # And Ctrl-C stops it cleanly
        proc.send_signal(signal.SIGINT)
        assert proc.wait(patience(15)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(patience(15))
    output = log_path.read_text()
    assert "Traceback" not in output, output
    assert output.splitlines() == ["sweeping saga deadlines every 0.1s; Ctrl-C to stop", "stopping"]


_SERVICE_APP = """
import os
from celery import Celery

app = Celery("svc", broker=os.environ["SVC_BROKER"], set_as_current=False)
app.conf.broker_transport_options = {"global_keyprefix": os.environ["SVC_KOMBU_PREFIX"]}


@app.task(name="svc.charge")
def charge():
    return None
"""


def test_check_lists_the_tasks_no_running_worker_has(idle: SimpleNamespace, tmp_path: Path) -> None:
    # Given no worker at all: nobody answers
    none = cli(idle.env, "check", "--timeout", "0.3")
    assert none.returncode == 69 and "no worker answered" in none.stderr

    # Given a worker of this app, and one of the service whose svc.charge the
    # cli_remote saga calls, but that has no svc.refund. The service's worker is
    # a process of its own: two in-process workers cannot be stopped one at a
    # time (Celery stops them by one process-wide flag).
    (tmp_path / "svc_app.py").write_text(_SERVICE_APP)
    env = {
        **idle.env,
        "PYTHONPATH": str(tmp_path),
        "SVC_BROKER": str(idle.shop.app.conf.broker_url),
        "SVC_KOMBU_PREFIX": idle.shop.app.conf.broker_transport_options["global_keyprefix"],
    }
    answers: list[subprocess.CompletedProcess[str]] = []
    with running(Subprocs(tmp_path)) as procs:
        procs.celery("svc", ["worker", "-P", "solo", "-n", f"svc@{idle.prefix}"], env, app="svc_app")
        with thread_worker(idle.shop.app, hostname=f"cli@{idle.prefix}"):

            def both_answer() -> bool:
                answers.append(cli(idle.env, "check"))
                return "2 worker(s) answered" in answers[-1].stdout

            wait_for(both_answer, 60, "both workers to answer")
    proc = answers[-1]
    # Then check lists the missing compensation, and only it, and exits 1
    assert proc.returncode == 1, proc.stdout + proc.stderr
    missing = [line.strip() for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert missing == ["saga 'cli_remote': compensation of step 'svc.charge': task 'svc.refund'"]
    assert "1 task(s) the sagas need are not registered on any worker" in proc.stderr


def test_signal_delivers_an_event_once_and_refuses_what_no_wait_takes(idle) -> None:
    # Given a saga waiting for "approval" in its first stage (no worker: a wait holds none)
    res = idle.shop.approval.apply_async(kwargs={"token": "t-1"})
    # When an operator delivers the event with data
    proc = cli(idle.env, "signal", res.id, "approval", "--data", '{"approved_by": "ann"}')
    # Then it is accepted: the wait completed with the data, and the saga went on to its next stage
    assert proc.returncode == 0, proc.stderr
    assert f"saga {res.id}: event 'approval' accepted" in proc.stdout
    record = shown(idle.env, res.id)
    wait = record["steps"][0]
    assert (wait["name"], wait["status"], wait["result"]) == ("wait:approval", "COMPLETED", {"approved_by": "ann"})
    assert (record["status"], record["steps"][1]["status"]) == ("RUNNING", "DISPATCHED")
    # ... a second delivery is accepted and changes nothing; the reject event comes too late
    again = cli(idle.env, "signal", res.id, "approval", "--data", '{"approved_by": "bob"}')
    assert again.returncode == 0 and shown(idle.env, res.id)["steps"][0]["result"] == {"approved_by": "ann"}
    late = cli(idle.env, "signal", res.id, "denied")
    assert late.returncode == 1 and "did not take event 'denied'" in late.stderr
    # ... an event no wait takes, bad JSON and an unknown saga are refused
    assert cli(idle.env, "signal", res.id, "nope").returncode == 1
    bad = cli(idle.env, "signal", res.id, "approval", "--data", "{nope")
    assert bad.returncode == 2 and "not JSON" in bad.stderr
    missing = cli(idle.env, "signal", "no-such-saga", "approval")
    assert missing.returncode == 1 and "not found" in missing.stderr
