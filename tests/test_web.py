"""``celery saga web`` in a real headless Chromium (Debian's chromium and chromedriver, driven by Selenium).

The server is the real Tornado application, serving the test's app from a
thread; the sagas run on a real in-process worker. Screenshots of the list
and of a saga page are saved under ``SAGA_WEB_ARTIFACTS`` (default: the
test's tmp_path) for a person to look at.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_saga import SagaCompensated, SagaFailed, SagaResult, SagaStatus
from celery_saga.views import state_json
from celery_saga.web import WebSettings, make_app
from tests import shop
from tests.helpers import Gates, patience, wait_for

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

needs_browser = pytest.mark.skipif(
    not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)),
    reason="needs Debian's chromium and chromium-driver (make test installs them when run as root)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def web_server(app: Celery, settings: WebSettings | None = None) -> Iterator[str]:
    """The web view of ``app`` on a free port, served by its own IO loop in a thread; its base URL."""
    port, started = free_port(), threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        server = make_app(app, settings).listen(port, address="127.0.0.1")
        holder["loop"], holder["server"] = loop, server
        started.set()
        loop.run_forever()
        server.stop()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(patience(10))
    prefix = settings.url_prefix if settings else ""
    try:
        yield f"http://127.0.0.1:{port}{prefix}"
    finally:
        holder["loop"].call_soon_threadsafe(holder["loop"].stop)
        thread.join(patience(10))


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    where = Path(os.environ.get("SAGA_WEB_ARTIFACTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def get(url: str, auth: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=patience(10)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def until(driver: Any, condition: Callable[[Any], Any], timeout: float = 20.0) -> Any:
    """Poll ``condition`` until it holds.

    The live refresh replaces the page's nodes: a node found a moment ago may
    be gone (stale, or "does not belong to the document") when it is read;
    the next poll finds the new one.
    """
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException, WebDriverException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(condition)


@pytest.fixture
def sagas(app: Celery, r, prefix) -> Any:
    return shop.build(app, r, prefix)


@needs_browser
def test_the_list_shows_every_status_and_search_finds_a_saga(
    app: Celery, r, prefix, worker, sagas, browser, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    app.conf.saga_compensation_max_retries = 0
    gates = Gates(r, prefix)
    r.hset(f"{prefix}:undo_fail", "shop.charge", 100)  # the refund never works: FAILED
    with worker():
        # Given a completed, a compensated, a failed and a running saga
        done = sagas.sequential.apply_async(kwargs={"order_id": 1}, idempotency_key="order-1")
        done.get(timeout=patience(30))
        undone = sagas.sequential.delay(order_id=2, fail={"charge": "card declined"})
        with pytest.raises(SagaCompensated):
            undone.get(timeout=patience(30))
        failed = sagas.sequential.delay(order_id=3, fail={"ship": "no truck"})
        with pytest.raises(SagaFailed):
            failed.get(timeout=patience(30))
        running = sagas.mixed.delay(order_id=4, gates=["ship"])
        gates.wait_entered("ship")
        try:
            with web_server(app) as base:
                # When an operator opens the list
                browser.get(base + "/")
                rows = {
                    row.get_attribute("data-id"): row.get_attribute("data-status")
                    for row in browser.find_elements(By.CSS_SELECTOR, "#sagas tbody tr[data-id]")
                }
                # Then every saga is there with its status, the failed one flagged, counts on top
                assert rows == {
                    done.id: "COMPLETED",
                    undone.id: "COMPENSATED",
                    failed.id: "FAILED",
                    running.id: "RUNNING",
                }
                assert "needs attention" in browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{failed.id}']").text
                assert "failure" in browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{undone.id}']").text
                count = browser.find_element(By.CSS_SELECTOR, "#counts [data-status='COMPLETED'] b").text
                assert count == "1"
                browser.save_screenshot(str(artifacts / "saga-list.png"))

                # And the search box finds a saga by id, by idempotency key and by a step's task id
                for query, expected in (
                    (undone.id, undone.id),
                    ("order-1", done.id),
                    (f"{failed.id}:shop.charge:undo", failed.id),
                ):
                    box = browser.find_element(By.NAME, "q")
                    box.clear()
                    box.send_keys(query)
                    box.submit()
                    until(browser, lambda d, e=expected: d.current_url.endswith(f"/saga/{e}"))
                browser.get(base + "/?q=nothing-like-this")
                assert browser.find_element(By.ID, "not-found").is_displayed()
                # A filter by status keeps only that status
                browser.get(base + "/?status=FAILED")
                shown = [e.get_attribute("data-id") for e in browser.find_elements(By.CSS_SELECTOR, "tr[data-id]")]
                assert shown == [failed.id]
        finally:
            gates.open("ship")
            running.get(timeout=patience(30))


@needs_browser
def test_a_compensated_saga_page_shows_steps_then_compensations_in_undo_order(
    app: Celery, r, prefix, worker, sagas, browser, artifacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    with worker():
        # Given a saga whose shipping failed after stock and payment were taken
        res = sagas.sequential.delay(order_id=5, fail={"ship": "the truck broke down"})
        with pytest.raises(SagaCompensated):
            res.get(timeout=patience(30))
        with web_server(app, WebSettings(flower_url="http://flower.example:5555")) as base:
            browser.get(f"{base}/saga/{res.id}")
            browser.save_screenshot(str(artifacts / "saga-page.png"))
            rows = [
                (row.get_attribute("data-step"), row.get_attribute("data-action"), row.get_attribute("data-status"))
                for row in browser.find_elements(By.CSS_SELECTOR, "#timeline tbody tr")
            ]
            # Then the steps run in order, then the compensations in reverse
            assert rows == [
                ("shop.validate", "step", "COMPLETED"),
                ("shop.reserve", "step", "COMPLETED"),
                ("shop.charge", "step", "COMPLETED"),
                ("shop.ship", "step", "FAILED"),
                ("shop.charge", "compensation", "COMPENSATED"),
                ("shop.reserve", "compensation", "COMPENSATED"),
            ]
            assert browser.find_element(By.ID, "status").text == "COMPENSATED"
            assert "rolled back (failure)" in browser.find_element(By.ID, "outcome").text
            assert "the truck broke down" in browser.find_element(By.ID, "failure").text
            ship = browser.find_element(By.CSS_SELECTOR, "#timeline tr[data-step='shop.ship']")
            assert "the truck broke down" in ship.text
            # Each step's keys and task ids, linked to Flower; the data at start and at the end
            charge = browser.find_element(By.CSS_SELECTOR, "#steps tr[data-step='shop.charge']")
            assert f"{res.id}:shop.charge" in charge.text
            link = charge.find_element(By.LINK_TEXT, f"{res.id}:shop.charge:undo")
            assert link.get_attribute("href") == f"http://flower.example:5555/task/{res.id}:shop.charge:undo"
            assert json.loads(browser.find_element(By.ID, "kwargs").text) == {
                "order_id": 5,
                "fail": {"ship": "the truck broke down"},
            }
            assert "payment" in json.loads(browser.find_element(By.ID, "data").text)
            # No actions without --enable-actions, and no auto-refresh once finished
            assert browser.find_elements(By.ID, "actions") == []
            assert browser.find_elements(By.CSS_SELECTOR, "meta[http-equiv='refresh']") == []


@needs_browser
def test_a_running_saga_page_updates_by_itself_and_actions_cancel_it(
    app: Celery, r, prefix, worker, sagas, browser
) -> None:
    from selenium.webdriver.common.by import By

    gates = Gates(r, prefix)
    with worker():
        first = sagas.mixed.delay(order_id=6, gates=["ship"])
        gates.wait_entered("ship")
        with web_server(app, WebSettings(enable_actions=True)) as base:
            # Given the page of a running saga, with ship planned-then-running and nothing undone
            browser.get(f"{base}/saga/{first.id}")
            assert browser.find_element(By.ID, "status").text == "RUNNING"
            # When the step it waits for goes on, the page follows by itself
            gates.open("ship")
            until(browser, lambda d: d.find_element(By.ID, "status").text == "COMPLETED")

            # And with --enable-actions, Cancel (a POST with the page's XSRF token) rolls a running saga back
            second = sagas.mixed.delay(order_id=7, gates=["ship"])
            wait_for(lambda: len(gates.entered("ship")) >= 2, what="the second saga to reach ship")
            browser.get(f"{base}/saga/{second.id}")
            browser.find_element(By.CSS_SELECTOR, "#actions button[value='cancel']").click()
            until(browser, lambda d: d.find_element(By.ID, "status").text == "COMPENSATED")
            assert "cancelled" in browser.find_element(By.ID, "outcome").text
            gates.open("ship")
            # A POST without the token is refused
            request = urllib.request.Request(f"{base}/saga/{first.id}/purge", data=b"", method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=patience(10))
            refused.value.close()
            assert refused.value.code == 403
            assert second.state().status is SagaStatus.COMPENSATED


def test_basic_auth_refuses_every_route_without_credentials(app: Celery, r, prefix, worker, sagas) -> None:
    with worker():
        res = sagas.sequential.delay(order_id=8)
        res.get(timeout=patience(30))
    settings = WebSettings(basic_auth=["ops:s3cret"], enable_actions=True)
    with web_server(app, settings) as base:
        for path in ("/", f"/saga/{res.id}", "/api/sagas", f"/api/sagas/{res.id}", "/metrics"):
            assert get(base + path)[0] == 401, path
            assert get(base + path, auth="ops:wrong")[0] == 401, path
            assert get(base + path, auth="ops:s3cret")[0] == 200, path
        # And a POST action without credentials is refused before anything happens
        request = urllib.request.Request(f"{base}/saga/{res.id}/purge", data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=patience(10))
        refused.value.close()
        assert refused.value.code in (401, 403)
        assert res.state().status is SagaStatus.COMPLETED


def test_the_api_is_the_json_of_the_cli_and_actions_are_off_by_default(app: Celery, r, prefix, worker, sagas) -> None:
    from celery_saga import admin

    with worker():
        res = sagas.sequential.delay(order_id=9)
        res.get(timeout=patience(30))
    with web_server(app, WebSettings(url_prefix="/sagas/")) as base:
        status, body = get(f"{base}/api/sagas/{res.id}")
        assert status == 200 and json.loads(body) == json.loads(json.dumps(state_json(res.state()), default=str))
        status, body = get(f"{base}/api/sagas?limit=10")
        assert json.loads(body) == {"sagas": [s.to_json() for s in admin.list_sagas(app, limit=10)]}
        assert get(f"{base}/api/sagas/no-such-saga")[0] == 404
        # Served under the prefix only
        assert get(base.replace("/sagas", "") + "/")[0] == 404
        page = get(f"{base}/saga/{res.id}")[1]
        assert "xsrf" not in page and "Purge" not in page


def test_the_list_is_newest_first_and_paged(app: Celery, r, prefix, worker, sagas) -> None:
    import re

    with worker():
        done = []
        for order_id in (10, 11, 12):
            res = sagas.sequential.delay(order_id=order_id)
            res.get(timeout=patience(30))
            done.append(res.id)
    with web_server(app, WebSettings(page_size=2)) as base:
        first = get(base + "/")[1]
        assert re.findall(r'<tr data-id="([^"]+)"', first) == [done[2], done[1]]
        older = re.findall(r'<a href="([^"]+)" id="next">', first)
        assert older == ["/?page=2"]
        second = get(base + older[0].replace("&amp;", "&"))[1]
        assert re.findall(r'<tr data-id="([^"]+)"', second) == [done[0]]
        assert 'id="next"' not in second
        # Filters: by name, and by a time range that holds none of them
        assert re.findall(r'<tr data-id="([^"]+)"', get(base + "/?name=order")[1]) == []
        assert re.findall(r'<tr data-id="([^"]+)"', get(base + "/?until=2000-01-01T00:00:00")[1]) == []
        assert get(base + "/?status=NOPE")[0] == 400


def test_pages_of_every_shape_render_a_pivot_a_wait_and_child_sagas(app: Celery, r, prefix, worker) -> None:
    from tests import test_nested, test_waits

    trips, waits = test_nested.build(app, r, prefix), test_waits.build(app, r, prefix)
    with worker():
        trip = trips.trip.delay(trip="w1")
        trip.get(timeout=patience(30))
        late = waits.late.delay(order_id=1)  # past its pivot, its wait times out: FAILED
        with pytest.raises(SagaFailed):
            late.get(timeout=patience(30))
        waiting = waits.refund.delay(order_id=2)
        wait_for(lambda: waiting.state().step("wait:approval").status.value == "DISPATCHED")
    with web_server(app) as base:
        for res, shown in (
            (trip, ["flight", "hotel", "n.charge"]),
            (SagaResult(f"{trip.id}:flight", app=app), ["n.book_flight", "n.seat"]),
            (late, ["w.pay", "wait:delivered"]),
            (waiting, ["wait:approval", "w.pay"]),
        ):
            status, page = get(f"{base}/saga/{res.id}")
            assert status == 200 and all(name in page for name in shown), (res.id, page[:500])
            status, body = get(f"{base}/api/sagas/{res.id}")
            assert json.loads(body) == json.loads(json.dumps(state_json(res.state()), default=str))
        # ... and link a child to its parent and back, and say where a saga stands against its pivot
        page = get(f"{base}/saga/{trip.id}")[1]
        assert f'href="/saga/{trip.id}:flight"' in page and f'href="/saga/{trip.id}:hotel"' in page
        assert f'child saga of <a href="/saga/{trip.id}"' in get(f"{base}/saga/{trip.id}:flight")[1]
        assert "pivot <b>w.pay</b>: passed" in get(f"{base}/saga/{late.id}")[1]
