"""Business keys (``Saga(search_keys=...)``) and re-runs, on real Redis, real workers and the CLI as a subprocess.

The sagas are ``tests.cli_app``'s, so that ``celery -A tests.cli_app saga ...``
acts on the same app: ``cli_order`` declares ``search_keys=("token",
"order_id")``.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from http.cookiejar import CookieJar
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode
from urllib.request import HTTPCookieProcessor, build_opener

import pytest
import redis

import celery_saga.rerun
from celery_saga import (
    Saga,
    SagaCompensated,
    SagaDataError,
    SagaDefinitionError,
    SagaResult,
    SagaStateError,
    SagaStatus,
    bulk,
    list_sagas,
    purge_saga,
    rerun_saga,
    saga_state,
)
from celery_saga.search import MAX_SEARCH_KEYS
from celery_saga.testing import thread_worker
from celery_saga.web import WebSettings
from tests import cli_app
from tests.helpers import finished, monitored, patience, wait_for
from tests.test_web import get, web_server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def world(redis_url: str) -> Iterator[SimpleNamespace]:
    prefix = f"keys-{uuid.uuid4().hex[:10]}"
    queue = f"{prefix}-q"
    s = cli_app.create(redis_url, prefix, queue)
    s.env = cli_app.cli_env(redis_url, prefix, queue)
    s.prefix = prefix
    yield s
    s.app.close()
    with redis.Redis.from_url(redis_url) as client:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.unlink(key)


def cli(s: SimpleNamespace, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", *args],
        env=s.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )


def index_keys(s: SimpleNamespace) -> list[str]:
    """The business key index sets of the world's store (store/keys.py ``k:<key>:<b>``)."""
    return sorted(s.client.scan_iter(match=f"{s.prefix}:{{s*}}:k:*", count=1000))


def entries(s: SimpleNamespace) -> list[str]:
    return sorted(m for key in index_keys(s) for m in s.client.zrange(key, 0, -1))


def test_sagas_are_found_by_their_business_keys_from_python_the_cli_and_show(world: SimpleNamespace) -> None:
    s = world
    # Given three sagas, two on order 7 (one as a string) and one on order 8, one of them compensated
    with thread_worker(s.app):
        done = s.order.apply_async(kwargs={"token": "t-a", "order_id": 7})
        undone = s.order.apply_async(kwargs={"token": "t-b", "order_id": "7", "fail": "charge"})
        other = s.order.apply_async(kwargs={"token": "t-c", "order_id": 8})
        assert [finished(x) for x in (done, undone, other)] == [
            SagaStatus.COMPLETED,
            SagaStatus.COMPENSATED,
            SagaStatus.COMPLETED,
        ]

    # When support looks order 7 up, by an integer or by text
    by_int = list_sagas(s.app, where={"order_id": 7})
    by_text = list_sagas(s.app, where=["order_id=7"])
    # Then both sagas of order 7 are found, newest first, and only they
    assert {x.saga_id for x in by_int} == {done.id, undone.id}
    assert [x.saga_id for x in by_text] == [x.saga_id for x in by_int]
    # And the keys combine with each other and with the other filters
    assert [x.saga_id for x in list_sagas(s.app, where={"order_id": 7, "token": "t-b"})] == [undone.id]
    assert [x.saga_id for x in list_sagas(s.app, where={"order_id": 7}, status="COMPENSATED")] == [undone.id]
    assert list_sagas(s.app, where={"order_id": 7}, name="cli_refund") == []
    assert [x.saga_id for x in list_sagas(s.app, where={"order_id": 8})] == [other.id]
    assert list_sagas(s.app, where={"order_id": 9}) == []

    # And the same from the command line, as JSON and as a table
    listed = cli(s, "list", "--where", "order_id=7", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {x["id"] for x in json.loads(listed.stdout)["sagas"]} == {done.id, undone.id}
    table = cli(s, "list", "--where", "order_id=8", "--where", "token=t-c")
    assert other.id in table.stdout and done.id not in table.stdout
    # A key no saga of the app declares is said to be so, not silently empty
    typo = cli(s, "list", "--where", "orderid=7")
    assert "no saga of this app declares orderid" in typo.stderr
    assert cli(s, "list", "--where", "order_id").returncode == 2  # not KEY=VALUE

    # And show, its JSON and the state display the keys
    assert saga_state(s.app, done.id).search_keys == {"token": "t-a", "order_id": "7"}
    shown = cli(s, "show", done.id)
    assert "business keys: token=t-a, order_id=7" in shown.stdout
    doc = json.loads(cli(s, "show", done.id, "--json").stdout)
    assert doc["search_keys"] == {"token": "t-a", "order_id": "7"}


def test_a_start_writes_its_business_keys_in_its_one_call(world: SimpleNamespace, redis_url: str) -> None:
    s = world
    plain = Saga("cli_order_plain", [s.reserve, s.charge, s.ship])
    # Warm up both (the first start of a definition stores it; the broker connection is made once)
    s.order.apply_async(kwargs={"token": "warm-1", "order_id": 1})
    plain.apply_async(kwargs={"token": "warm-2", "order_id": 1})

    # (No worker runs: the only client of the prefix is the start)
    with monitored(redis_url) as keyed_calls:
        keyed = s.order.apply_async(kwargs={"token": "rt-1", "order_id": 42})
    with monitored(redis_url) as plain_calls:
        plain.apply_async(kwargs={"token": "rt-2", "order_id": 42})

    def by_client(calls: list[tuple[str, str]]) -> list[str]:
        return [c.split(" ")[0].upper() for kind, c in calls if kind != "lua" and s.prefix in c]

    # Then the start with business keys sent what the start without sends: one call
    assert by_client(keyed_calls) == by_client(plain_calls) == ["FCALL"]
    # And its entries were written inside that call
    zadds = [c for kind, c in keyed_calls if kind == "lua" and c.upper().startswith("ZADD ") and ":k:" in c]
    assert len(zadds) == 2, keyed_calls
    assert [x.saga_id for x in list_sagas(s.app, where={"order_id": 42})] == [keyed.id]


def test_an_index_entry_costs_under_100_bytes_per_key(world: SimpleNamespace) -> None:
    s = world
    n = 600
    # Given n sagas started with two business keys each (no worker: they stay PENDING)
    for i in range(n):
        s.order.apply_async(kwargs={"token": f"tok-{uuid.uuid4().hex[:12]}", "order_id": 1_000_000 + i})
    keys = index_keys(s) + sorted(s.client.scan_iter(match=f"{s.prefix}:{{s*}}:keys"))
    # Then the index (every set, counted exactly) costs under 100 B per key and saga
    used = sum(int(s.client.memory_usage(k, samples=0) or 0) for k in keys)
    assert sum(s.client.zcard(k) for k in index_keys(s)) == 2 * n
    assert used / (2 * n) < 100, used / (2 * n)


def test_entries_go_with_their_record_purged_or_expired(world: SimpleNamespace) -> None:
    s = world
    with thread_worker(s.app):
        purged = s.order.apply_async(kwargs={"token": "gone-2", "order_id": 6})
        assert finished(purged) is SagaStatus.COMPLETED
        # The retention is recorded at start: this one's record expires a second after it completes
        s.app.conf.saga_retention = 1.0
        kept = s.order.apply_async(kwargs={"token": "gone-1", "order_id": 5})
        assert finished(kept) is SagaStatus.COMPLETED
    # A purge takes its entries with it, at once
    assert [m for m in entries(s) if m.endswith(purged.id)]
    purge_saga(s.app, purged.id)
    assert not [m for m in entries(s) if m.endswith(purged.id)]

    # Once a record expires, readers no longer find it, and the collection removes its entries
    wait_for(lambda: not s.client.exists(f"{s.prefix}:{{{kept.id}}}"), what="the record to expire")
    assert list_sagas(s.app, where={"order_id": 5}) == []
    assert [m for m in entries(s) if m.endswith(kept.id)]  # still there: nothing removed them yet
    # And a worker's sweeper collects them (its first pass does, then once a minute)
    with thread_worker(s.app):
        wait_for(lambda: not entries(s), what="the sweeper to remove the expired record's entries")


def test_business_keys_are_checked_at_definition_and_at_start(world: SimpleNamespace) -> None:
    s = world
    too_many = tuple(f"k{i}" for i in range(MAX_SEARCH_KEYS + 1))
    with pytest.raises(SagaDefinitionError, match="at most 8"):
        Saga("too_many_keys", [s.reserve], search_keys=too_many)
    with pytest.raises(SagaDefinitionError, match="no kwarg name"):
        Saga("bad_key", [s.reserve], search_keys=("order-id",))
    with pytest.raises(SagaDefinitionError, match="twice"):
        Saga("twice", [s.reserve], search_keys=("token", "token"))

    # A value that is no string or integer is refused before anything is written
    for bad in (7.5, True, {"id": 7}, "x" * 201):
        with pytest.raises(SagaDataError, match="order_id"):
            s.order.apply_async(kwargs={"token": "bad", "order_id": bad})
    assert not list(s.client.scan_iter(match=f"{s.prefix}:{{*-*-*-*-*}}"))
    assert entries(s) == []
    # And an absent (or None) key is simply not indexed
    started = s.order.apply_async(kwargs={"token": "no-order"})
    assert [x.saga_id for x in list_sagas(s.app, where={"token": "no-order"})] == [started.id]
    assert saga_state(s.app, started.id).search_keys == {"token": "no-order"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        list_sagas(s.app, where=["order_id"])


def test_a_rerun_is_a_new_saga_linked_both_ways_and_made_once(world: SimpleNamespace) -> None:
    s = world
    on_failure = s.notify.s("failed")
    with thread_worker(s.app):
        # Given an order that was compensated (its charge declined), started with an idempotency key
        first = s.order.apply_async(
            kwargs={"token": "rr-1", "order_id": 70, "fail": "charge"},
            idempotency_key="order-70",
            on_failure=on_failure,
        )
        with pytest.raises(SagaCompensated):
            first.get(timeout=patience(30))
        # When an operator re-runs it
        again = rerun_saga(s.app, first.id)
        # Then it is a new saga of the same name and kwargs, with no idempotency key
        assert again.id != first.id
        finished(again)
        new = saga_state(s.app, again.id)
        kwargs = {"token": "rr-1", "order_id": 70, "fail": "charge"}
        assert (new.name, new.kwargs, new.idempotency_key) == ("cli_order", kwargs, None)
        # And the two are linked both ways, in the state, show and its JSON
        assert new.rerun_of == first.id
        assert saga_state(s.app, first.id).reruns == (again.id,)
        assert f"re-run as {again.id}" in cli(s, "show", first.id).stdout
        assert json.loads(cli(s, "show", again.id, "--json").stdout)["rerun_of"] == first.id
        # And the first saga keeps its key: a start with it is still the first saga
        assert s.order.apply_async(kwargs=kwargs, idempotency_key="order-70").id == first.id
        # And the re-run carries the first's callbacks (it failed again: on_failure once for each)
        wait_for(lambda: s.callbacks(again.id) == ["failed"], what="the re-run's on_failure")

        # A second re-run is refused, naming the first; again=True makes one more
        with pytest.raises(SagaStateError, match=f"re-run already, as {again.id}"):
            rerun_saga(s.app, first.id)
        third = rerun_saga(s.app, first.id, again=True)
        assert saga_state(s.app, first.id).reruns == (again.id, third.id)
        finished(third)
        # Only a COMPENSATED or FAILED saga is re-run
        ok = s.order.apply_async(kwargs={"token": "rr-ok"})
        assert finished(ok) is SagaStatus.COMPLETED
        with pytest.raises(SagaStateError, match="COMPENSATED or FAILED"):
            rerun_saga(s.app, ok.id)

        # And a bulk re-run by filter re-runs each once: run again over the same window, it skips them
        batch = [s.order.apply_async(kwargs={"token": f"bulk-{i}", "fail": "ship"}) for i in range(3)]
        assert {finished(x) for x in batch} == {SagaStatus.COMPENSATED}
        window = datetime.now(UTC)
        report = bulk(s.app, "rerun", name="cli_order", where={"fail": "ship"}, until=window)
        assert (report.matched, report.acted, report.error_count) == (3, 3, 0)
        reruns = [saga_state(s.app, x.id).reruns for x in batch]
        assert all(len(r) == 1 for r in reruns)
        repeat = bulk(s.app, "rerun", name="cli_order", where={"fail": "ship"}, until=window)
        assert (repeat.matched, repeat.acted, dict(repeat.skipped)) == (3, 0, {"re-run already": 3})
        for (rerun_id,) in reruns:
            finished(SagaResult(rerun_id, app=s.app))


def test_a_child_saga_is_not_re_run_on_its_own(world: SimpleNamespace) -> None:
    s = world
    kid = Saga("cli_kid", [s.charge])
    parent = Saga("cli_parent", [s.reserve, kid])
    with thread_worker(s.app):
        res = parent.apply_async(kwargs={"token": "kid-1", "fail": "charge"})
        assert finished(res) is SagaStatus.COMPENSATED
    child_id = f"{res.id}:cli_kid"
    assert saga_state(s.app, child_id).status is SagaStatus.COMPENSATED
    with pytest.raises(SagaStateError, match=f"a step of saga {res.id}: re-run that one"):
        rerun_saga(s.app, child_id)
    assert saga_state(s.app, child_id).reruns == ()


def test_a_rerun_of_a_changed_definition_runs_the_current_one_and_says_so(world: SimpleNamespace) -> None:
    s = world
    old = Saga("cli_evolving", [s.reserve, s.charge])
    with thread_worker(s.app):
        first = old.apply_async(kwargs={"token": "ev-1", "fail": "charge"})
        assert finished(first) is SagaStatus.COMPENSATED
        # Given a deploy: the old definition is gone from this process, the new one defined
        del old
        gc.collect()
        new = Saga("cli_evolving", [s.reserve, s.ship])
        # When the saga is re-run, it runs the current definition, and says so
        done = celery_saga.rerun.rerun(s.app, first.id)
        assert done.plan_changed and done.old_plan != done.new_plan == new.plan_digest()
        assert finished(done.result) is SagaStatus.COMPLETED
        assert [x.name for x in saga_state(s.app, done.result.id).steps] == ["cli.reserve", "cli.ship"]

        # And a cli_order run by another version of it (two steps, not three) ...
        variant = Saga("cli_order", [s.reserve, s.ship])
        older = variant.apply_async(kwargs={"token": "ev-2", "fail": "ship"})
        assert finished(older) is SagaStatus.COMPENSATED
    # ... re-run by the CLI, whose app has today's cli_order, says the definition changed
    out = cli(s, "rerun", older.id)
    assert out.returncode == 0, out.stderr
    assert "definition changed" in out.stdout and "re-run as" in out.stdout
    # And a saga whose name the CLI's app does not define is refused, saying what to do
    refused = cli(s, "rerun", first.id, "--again")
    assert refused.returncode != 0
    assert "does not define" in refused.stderr and "import the module" in refused.stderr


def test_the_web_view_finds_sagas_by_business_key_and_acts_on_a_filtered_list(world: SimpleNamespace) -> None:
    s = world
    with thread_worker(s.app):
        # Given two compensated sagas of order 7 and one of order 8
        seven = [s.order.apply_async(kwargs={"token": f"w-{i}", "order_id": 7, "fail": "charge"}) for i in range(2)]
        eight = s.order.apply_async(kwargs={"token": "w-8", "order_id": 8, "fail": "charge"})
        assert {finished(x) for x in (*seven, eight)} == {SagaStatus.COMPENSATED}
        with web_server(s.app, WebSettings(enable_actions=True)) as base:
            browser = build_opener(HTTPCookieProcessor(CookieJar()))

            def page(path: str, form: list[tuple[str, str]] | None = None) -> str:
                data = None if form is None else urlencode(form).encode()
                with browser.open(base + path, data=data, timeout=patience(30)) as response:
                    return str(response.read().decode())

            # When support types order_id=7 in the search box, the list shows order 7's sagas only
            listed = page("/?" + urlencode({"q": "order_id=7"}))
            assert all(x.id in listed for x in seven) and eight.id not in listed
            # And the JSON API takes the same business keys
            api = json.loads(page("/api/sagas?" + urlencode({"where": "order_id=7"})))
            assert {x["id"] for x in api["sagas"]} == {x.id for x in seven}
            assert get(base + "/api/sagas?" + urlencode({"where": "order_id"}))[0] == 400
            # And a saga's page shows its keys, each a link to that search
            shown = page(f"/saga/{seven[0].id}")
            assert 'id="business-keys"' in shown and "order_id=7" in shown

            # When an operator asks to re-run every saga of the filtered list, a page confirms the count first
            confirm = page("/bulk?" + urlencode({"action": "rerun", "q": "order_id=7", "status": "COMPENSATED"}))
            assert re.search(r'id="count"><b>2</b> sagas match', confirm), confirm
            assert not any(saga_state(s.app, x.id).reruns for x in seven)  # counting changed nothing
            # And confirming (the form, with its CSRF token) re-runs exactly those
            form = re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', confirm)
            assert "_xsrf" in dict(form)
            report = page("/bulk", form)
            assert re.search(r"2 matched, <b>2</b> done", report), report
            assert [len(saga_state(s.app, x.id).reruns) for x in seven] == [1, 1]
            assert saga_state(s.app, eight.id).reruns == ()
            # And a single saga's Re-run button starts one, and opens its page
            form = re.findall(r'name="_xsrf" value="([^"]*)"', page(f"/saga/{eight.id}"))
            rerun_page = page(f"/saga/{eight.id}/rerun", [("_xsrf", form[0])])
            assert "a re-run: this is a new saga" in rerun_page and f"/saga/{eight.id}" in rerun_page
            for x in (*seven, eight):
                for rerun_id in saga_state(s.app, x.id).reruns:
                    finished(SagaResult(rerun_id, app=s.app))
        # And without --enable-actions there is no bulk page at all
        with web_server(s.app) as base:
            status, _ = get(base + "/bulk?" + urlencode({"action": "purge"}))
            assert status == 403
