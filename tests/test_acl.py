"""Least privilege: the saga user ``docs/deployments.md`` gives runs everything, and Redis refuses it nothing.

The user is read from the page itself (its ``ACL SETUSER`` block, and the
table of optional grants), so the page cannot drift from what the store
needs. Each test runs its saga store on a ``redis-server`` of its own, where
it may create users and read ``ACL LOG``; the broker stays the shared Redis.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from celery_saga import Saga, SagaCompensated, SagaStatus, SagaStoreMisconfigured, list_sagas
from celery_saga.redis_server import PRIVATE_SERVER_KEY, RedisServer
from celery_saga.store.keys import Keys
from celery_saga.store.redis import RedisSagaStore
from celery_saga.stores import store_for
from tests import cli_app
from tests import shop as shop_module
from tests.helpers import Ledger, patience, wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "deployments.md"
PASSWORD = "saga-pw"


def _least_privilege_section() -> str:
    text = DOCS.read_text()
    start = text.index("## Least privilege")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def documented_rules() -> list[str]:
    """The rules of the page's ``ACL SETUSER saga ...`` block, as written (password, ``saga`` prefix)."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", _least_privilege_section(), re.S)
    (block,) = [b for b in blocks if "ACL SETUSER" in b]
    words = block.split()
    assert words[:3] == ["ACL", "SETUSER", "saga"], block
    return words[3:]


def optional_grants() -> set[str]:
    """The commands the page's table of optional grants names in its first column (``+fcall`` -> ``fcall``)."""
    grants: set[str] = set()
    for line in _least_privilege_section().splitlines():
        if line.startswith("| `+"):
            # A pipe inside a table cell is escaped ("+config\\|get"): split the row on the others.
            first = line.replace("\\|", "\0").split("|")[1].replace("\0", "|")
            grants |= set(re.findall(r"`\+([\w|-]+)`", first))
    assert grants, "the page names no optional grants"
    return grants


def documented_commands() -> list[str]:
    """The commands the block grants, without the ``+``."""
    return [rule[1:] for rule in documented_rules() if rule.startswith("+")]


def _for(prefix: str, rule: str) -> str:
    """A documented rule for this test's user: its password, and ``prefix`` for the page's ``saga`` prefix."""
    if rule.startswith(">"):
        return f">{PASSWORD}"
    return re.sub(r"^([%RW]*~|&)saga:", lambda m: f"{m[1]}{prefix}:", rule)


def saga_user(server: RedisServer, prefix: str, add: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> str:
    """Create (again) the page's saga user on ``server``, for keys under ``prefix``; its URL.

    ``add`` and ``drop``: commands (without the ``+``) to grant beyond the page's, or to leave out.
    """
    rules = [_for(prefix, rule) for rule in documented_rules() if rule[1:] not in drop]
    # The page's patterns must have been rewritten: else the user could touch nothing of this test's.
    assert f"~{prefix}:{{*" in rules and f"&{prefix}:{{*" in rules, rules
    rules += [f"+{command}" for command in add]
    with _client(server) as admin:
        # As the page says, for redis-py's own CLIENT calls on each new connection (Redis 7.0 knows neither).
        version = _version(admin)
        if version < (7, 0):
            rules += ["+client|setinfo", "+client|maint_notifications"]
        elif version >= (7, 2):
            rules.append("+client|setinfo")
        admin.execute_command("ACL", "SETUSER", "saga", "reset", *rules)
    return f"redis://saga:{PASSWORD}@127.0.0.1:{server.port}/0"


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, password=server.password, decode_responses=True)


def _version(admin: redis.Redis) -> tuple[int, ...]:
    return tuple(int(x) for x in str(admin.info("server")["redis_version"]).split(".")[:2])


def refused(admin: redis.Redis) -> list[dict[str, Any]]:
    """What Redis refused the saga user (``ACL LOG``: reason, object, count)."""
    return [entry for entry in admin.acl_log() if entry.get("username") == "saga"]


def optional(entry: dict[str, Any]) -> bool:
    """A refusal of a command the page names as optional (Redis 6.2 names a subcommand by its command)."""
    grants = optional_grants()
    return entry["reason"] == "command" and entry["object"] in grants | {g.split("|")[0] for g in grants}


@pytest.fixture
def store_server(app: Celery) -> Iterator[RedisServer]:
    """A private Redis for the test's saga store."""
    with RedisServer() as server:
        app.conf.saga_redis_url = server.url
        yield server


def cli(env: dict[str, str], *args: str) -> Any:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", *args, "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "NOPERM" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_the_documented_acl_runs_sagas_get_and_the_cli_and_redis_refuses_nothing_it_needs(
    app: Celery,
    store_server: RedisServer,
    r: redis.Redis,
    redis_url: str,
    prefix: str,
    ledger: Ledger,
    worker: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given the saga user of docs/deployments.md, exactly, for this test's prefix (8 index shards: the CLI app's)
    url = saga_user(store_server, prefix)
    app.conf.update(saga_redis_url=url, saga_index_shards=8)
    admin = _client(store_server)
    admin.acl_log_reset()
    s = shop_module.build(app, r, prefix)
    keys = Keys(prefix, 8)
    for logger in ("celery_saga", "celery"):
        caplog.set_level(logging.WARNING, logger=logger)

    with worker():
        # When it runs a saga that completes, one that rolls back, and one with a parallel stage
        completed = s.sequential.delay(order_id=1)
        assert completed.get(timeout=patience(20))["tracking"] == "t-1"
        compensated = s.sequential.delay(order_id=2, fail={"ship": "no"})
        with pytest.raises(SagaCompensated):
            compensated.get(timeout=patience(20))
        fanned = s.mixed.delay(order_id=3)
        assert fanned.get(timeout=patience(20))["tracking"] == "t-3"
        # ... and one found by its business key, whose expired entries a collection looks for
        keyed = Saga("order_keyed", [s.reserve], search_keys=("order_id",)).delay(order_id=9)
        assert keyed.get(timeout=patience(20))["reservation"]
        assert [x.saga_id for x in list_sagas(app, where={"order_id": 9})] == [keyed.id]
        assert store_for(app).collect_search() == 0

        # ... and get() calls that must wait, started while their saga is held in a step. Twice in one
        # thread: the second reuses the thread's subscriber connection, whose channel the first left.
        waited = []
        with ThreadPoolExecutor(max_workers=1) as pool:
            for order_id in (4, 5):
                held = s.sequential.delay(order_id=order_id, gates=["ship"])
                s.gates.wait_entered("ship", order_id - 3)
                # The poll interval is the whole timeout: only the end message can wake it in time.
                timeout = patience(20)
                deadline = time.monotonic() + timeout
                waiting = pool.submit(held.get, timeout=timeout, interval=timeout)
                channel = keys.end_channel(held.id)
                try:
                    wait_for(lambda c=channel: admin.pubsub_numsub(c)[0][1] == 1, 10, "get() to subscribe")
                finally:
                    s.gates.open("ship")
                assert waiting.result()["tracking"] == f"t-{order_id}"
                assert time.monotonic() < deadline, "get() was not woken by the saga's end"
                waited.append(held)

        # ... and the CLI reads them with the same user
        env = {**cli_app.cli_env(redis_url, prefix, "q-cli"), cli_app.ENV_STORE: url}
        listed = {saga["id"]: saga["status"] for saga in cli(env, "list")["sagas"]}
        assert listed[completed.id] == "COMPLETED" and listed[compensated.id] == "COMPENSATED"
        shown = cli(env, "show", fanned.id)
        assert shown["status"] == "COMPLETED" and {st["name"] for st in shown["steps"]} >= {"shop.ship", "shop.receipt"}
        assert cli(env, "stats")["by_name"]["order_seq"]["COMPLETED"] == 3

    # Then the sagas ended as they should
    assert [a for a in ledger.actions() if a.startswith("undo")] == ["undo:shop.charge", "undo:shop.reserve"]
    # ... and Redis refused the user no command but those the page names as optional
    denied = [entry for entry in refused(admin) if not optional(entry)]
    assert denied == [], denied
    # ... and nothing logged a refusal
    assert "NOPERM" not in caplog.text
    # ... and each ended record was packed: a few fields kept as they are (TOP in transitions.lua), the rest
    # in the values of z1 .. z<zn>
    for res in (completed, compensated, fanned, *waited):
        record = admin.hgetall(keys.record(res.id))
        unpacked = {field for field in record if not re.fullmatch(r"z(\d+|n)", field)}
        assert "zn" in record and unpacked <= {"status", "status_at", "name", "gen", "v", "cbs"}, sorted(record)


def test_a_command_missing_from_the_acl_is_named(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str
) -> None:
    # Given the documented saga user less one command the scripts need (TIME)
    assert "time" in documented_commands()
    app.conf.saga_redis_url = saga_user(store_server, prefix, drop=("time",))
    s = shop_module.build(app, r, prefix)

    # When a saga starts, Then the error names the command
    with pytest.raises(SagaStoreMisconfigured, match="may not run the 'time' command"):
        s.sequential.delay(order_id=1)


def test_a_command_missing_from_a_function_library_is_named(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str
) -> None:
    # Given a saga user that may load and call the transitions as a function library (Redis 7.0 names only
    # the function and its line in the error), but lacks HSET, which every transition writes with
    assert {"fcall", "function|load"} <= optional_grants()
    with _client(store_server) as admin:
        if _version(admin) < (7, 0):
            pytest.skip("Redis 6.2 has no functions")
    app.conf.saga_redis_url = saga_user(store_server, prefix, add=("fcall", "function|load"))
    s = shop_module.build(app, r, prefix)
    assert s.sequential.delay(order_id=1).status is SagaStatus.PENDING
    store = store_for(app)
    assert isinstance(store, RedisSagaStore) and store._functions is True
    saga_user(store_server, prefix, add=("fcall", "function|load"), drop=("hset",))

    # When a saga starts
    with pytest.raises(SagaStoreMisconfigured) as info:
        s.sequential.delay(order_id=2)

    # Then the error names the command, not only the function's line
    assert "@user_function" in str(info.value)
    assert "may not run the 'hset' command" in str(info.value)


def test_a_least_privilege_user_with_config_get_is_warned_about_a_store_that_can_lose_sagas(
    app: Celery, store_server: RedisServer, r: redis.Redis, prefix: str, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given the documented saga user plus the optional CONFIG GET, on a server that evicts any key and keeps
    # nothing on disk (a private server, whose mark the user may not read: its key is not the prefix's)
    assert "config|get" in optional_grants()
    _client(store_server).config_set("maxmemory-policy", "allkeys-lru")
    app.conf.saga_redis_url = saga_user(store_server, prefix, add=("config|get",))
    shop_module.build(app, r, prefix)

    # When a worker starts
    with caplog.at_level(logging.WARNING, logger="celery_saga"), worker():
        pass

    # Then it says so, in its one warning
    (warning,) = [m for m in caplog.messages if "configuration warning" in m]
    assert "maxmemory-policy allkeys-lru" in warning and "keeps nothing on disk" in warning
    # ... and Redis refused it only what the page says: optional commands, and the read of the private server's mark
    denied = [e for e in refused(_client(store_server)) if not optional(e)]
    assert [(e["reason"], e["object"]) for e in denied] == [("key", PRIVATE_SERVER_KEY)], denied
