"""The web view's hardening (issue 20, item 6): each finding of the security review, reproduced.

The server is the real Tornado application on a free port (served from a
thread as in ``tests.test_web``, or by `serve` itself, or by ``celery saga
web`` as a subprocess); requests are real HTTP, the store is the real Redis.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from http.cookies import SimpleCookie
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import pytest
from celery import Celery

from celery_saga.store.keys import Keys
from celery_saga.web import WebSettings, serve
from tests import cli_app, shop
from tests.helpers import patience, store_now, wait_for
from tests.test_web import free_port, web_server

ROOT = Path(__file__).resolve().parent.parent
IMG = "<img src=x onerror=alert(1)>"
SCRIPT = "<script>alert(1)</script>"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Message
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(
    url: str,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    auth: bytes | None = None,
) -> Reply:
    """One request, as sent (no redirect followed, the path not re-quoted)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=patience(10))
    sent = dict(headers or {})
    if auth is not None:
        sent["Authorization"] = "Basic " + base64.b64encode(auth).decode()
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body, headers=sent)
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read().decode())
    finally:
        conn.close()


@pytest.fixture
def sagas(app: Celery, r, prefix) -> Any:
    return shop.build(app, r, prefix)


@pytest.fixture
def idle(redis_url: str) -> Iterator[SimpleNamespace]:
    """A CLI subprocess's app (``tests.cli_app``) under a fresh prefix, with no worker."""
    with cli_app.idle(redis_url, f"sagaweb-{uuid.uuid4().hex[:10]}") as w:
        yield w


def celery_saga(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``celery saga ...`` that is expected to exit on its own."""
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=patience(60),
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def no_markup(reply: Reply) -> None:
    body = reply.body.lower()
    assert "<script" not in body and "<img" not in body, reply.body


# -- M1: reflected XSS in error bodies -----------------------------------------


def test_error_bodies_escape_what_they_echo(app: Celery, r, prefix) -> None:
    # Given a record whose id is markup: ids are stored data, never trusted (this one cannot be parsed)
    keys = Keys(prefix)
    r.hset(keys.record(SCRIPT), mapping={"status": "COMPLETED", "name": "shop", "plan": "{"})
    with web_server(app) as base:
        # When filters and ids carry markup, the error bodies echo them escaped, in HTML ...
        for path, status, echoed in (
            ("/?" + urlencode({"status": IMG}), 400, "&lt;img src=x onerror=alert(1)&gt;"),
            ("/?" + urlencode({"since": IMG}), 400, "&lt;img src=x onerror=alert(1)&gt;"),
            ("/saga/" + quote(SCRIPT, safe=""), 500, "&lt;script&gt;alert(1)&lt;/script&gt;"),
            ("/saga/" + quote(IMG, safe=""), 404, "&lt;img src=x onerror=alert(1)&gt;"),
        ):
            reply = fetch(base + path)
            assert reply.status == status, (path, reply.body)
            assert echoed in reply.body, (path, reply.body)
            no_markup(reply)
            assert reply.headers["X-Content-Type-Options"] == "nosniff"
            # ... and never in the HTTP reason phrase
            assert "<" not in reply.headers.get("Reason", "")
        # ... and in JSON, where "<" and ">" are \u escapes
        for path, status, echoed in (
            ("/api/sagas?" + urlencode({"status": IMG}), 400, IMG.upper()),
            ("/api/sagas?" + urlencode({"limit": IMG}), 400, IMG),
            ("/api/sagas/" + quote(SCRIPT, safe=""), 500, SCRIPT),
            ("/api/sagas/" + quote(IMG, safe=""), 404, IMG),
        ):
            reply = fetch(base + path)
            assert reply.status == status, (path, reply.body)
            assert reply.headers["Content-Type"].startswith("application/json")
            assert echoed in reply.json()["error"], (path, reply.body)
            no_markup(reply)
        # And a search for markup says "not found" with the query escaped
        reply = fetch(base + "/?" + urlencode({"q": IMG}))
        assert reply.status == 200 and "&lt;img src=x onerror=alert(1)&gt;" in reply.body
        no_markup(reply)


# -- the URL prefix ------------------------------------------------------------


def test_the_url_prefix_is_validated_and_matched_literally(app: Celery, idle) -> None:
    # A prefix that is not plain path segments is refused, with the option named
    for bad in ("/s(a)", "/a b", "/x?y", "/a#b", "/a//b", "/a/../b", "/%2e", "/[a-z]+"):
        with pytest.raises(ValueError, match="prefix") as refused:
            WebSettings(url_prefix=bad)
        assert getattr(refused.value, "option", None) == "--url-prefix", bad
    # (and so is a Flower URL that is not http or https: it becomes the links of task ids)
    with pytest.raises(ValueError, match="Flower") as refused:
        WebSettings(flower_url="javascript:alert(1)//")
    assert getattr(refused.value, "option", None) == "--flower-url"
    # A valid one holding a regex metacharacter is matched as written
    with web_server(app, WebSettings(url_prefix="/v1.0/sagas/")) as base:
        assert base.endswith("/v1.0/sagas")
        assert fetch(base + "/").status == 200
        assert fetch(base.replace("/v1.0/", "/v1x0/") + "/").status == 404
    # And `celery saga web` says which option is wrong, in one line, without starting
    proc = celery_saga(idle.env, "web", "--port", str(free_port()), "--url-prefix", "/s(a)")
    assert proc.returncode == 2 and "--url-prefix" in proc.stderr, proc.stderr


# -- basic auth ----------------------------------------------------------------


def test_basic_auth_compares_utf8_bytes_and_never_fails_on_odd_headers(app: Celery) -> None:
    with web_server(app, WebSettings(basic_auth=["opé:pässwört", "ci:plain"])) as base:
        assert fetch(base + "/metrics", auth="opé:pässwört".encode()).status == 200
        assert fetch(base + "/metrics", auth=b"ci:plain").status == 200
        for wrong in ("opé:passwort".encode(), "opé:pässwört".encode("latin-1"), b"\xff\xfe:\x00", b"ci:plai"):
            assert fetch(base + "/metrics", auth=wrong).status == 401, wrong
        for header in ("Basic ***", "Basic " + "é" * 8, "Bearer abc", "basic"):
            reply = fetch(base + "/metrics", headers={"Authorization": header})
            assert reply.status == 401, header


@pytest.fixture
def web_process(tmp_path: Path) -> Iterator[Any]:
    """Start ``celery saga web`` subprocesses; each is stopped by its PID at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        with open(tmp_path / f"web-{len(started)}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.cli_app", "saga", "web", *args],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(patience(15))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(patience(15))


def test_credentials_come_from_the_environment_and_a_file_not_the_command_line(
    idle, tmp_path: Path, web_process
) -> None:
    # Given credentials in a file (one a line, comments and blank lines skipped) and in the environment
    secrets = tmp_path / "web-auth"
    secrets.write_text("# operators\nops:fïle-secret\n\nci:with:colons \n", encoding="utf-8")
    secrets.chmod(0o600)
    env = {**idle.env, "CELERY_SAGA_WEB_AUTH": "env1:e1-secret , env2:e2:secret"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    # When the server is started with the file and one --basic-auth on the command line
    proc = web_process(env, "--port", str(port), "--basic-auth-file", str(secrets), "--basic-auth", "cli:cli-secret")
    wait_for(lambda: proc.poll() is not None or _answers(base), timeout=30, what="celery saga web to listen")
    assert proc.poll() is None, (tmp_path / "web-0.log").read_text()
    # Then every source's credentials work (commas split the variable's entries, spaces around them dropped)
    for good in ("ops:fïle-secret", "ci:with:colons", "env1:e1-secret", "env2:e2:secret", "cli:cli-secret"):
        assert fetch(base + "/metrics", auth=good.encode()).status == 200, good
    for bad in ("env1:e1-secret ", "ops:wrong", "ci:with:colons "):
        assert fetch(base + "/metrics", auth=bad.encode()).status == 401, bad
    # And only --basic-auth's password is on the command line others can read (ps)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    assert "cli-secret" in cmdline and "fïle-secret" not in cmdline and "e1-secret" not in cmdline

    # A malformed entry is refused in one line that names its source, not the secret in it
    secrets.write_text("ops:fine\njustapassword\n", encoding="utf-8")
    refused = celery_saga(idle.env, "web", "--port", str(free_port()), "--basic-auth-file", str(secrets))
    assert refused.returncode == 2 and "line 2" in refused.stderr and "justapassword" not in refused.stderr
    refused = celery_saga(
        {**idle.env, "CELERY_SAGA_WEB_AUTH": "ops:fine,nocolon-secret"}, "web", "--port", str(free_port())
    )
    assert refused.returncode == 2 and "CELERY_SAGA_WEB_AUTH" in refused.stderr
    assert "nocolon-secret" not in refused.stderr


def _answers(base: str) -> bool:
    try:
        return fetch(base + "/metrics").status == 401
    except OSError:
        return False


# -- CSRF ----------------------------------------------------------------------


def test_actions_need_a_strict_cookie_and_refuse_foreign_origins(app: Celery, r, prefix, worker, sagas) -> None:
    with worker():
        res = sagas.sequential.delay(order_id=1)
        res.get(timeout=patience(30))
    record = Keys(prefix).record(res.id)
    with web_server(app, WebSettings(enable_actions=True)) as base:
        # Given the page of a finished saga, which sets the CSRF cookie and holds the token
        page = fetch(f"{base}/saga/{res.id}")
        cookies = SimpleCookie()
        for header in page.headers.get_all("Set-Cookie") or []:
            cookies.load(header)
        xsrf = cookies["_xsrf"]
        # Then the cookie is SameSite=Strict and HttpOnly, and no other site may frame the buttons
        assert xsrf["samesite"] == "Strict" and xsrf["httponly"] is True
        assert page.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        # (and the note an action leaves is one of its own, never text from the link)
        lured = fetch(f"{base}/saga/{res.id}?" + urlencode({"done": "call +1 555 0100 to keep your order"}))
        assert lured.status == 200 and "555 0100" not in lured.body
        found = re.search(r'name="_xsrf" value="([^"]+)"', page.body)
        assert found is not None
        own = urlsplit(base).netloc

        def purge(**headers: str) -> Reply:
            return fetch(
                f"{base}/saga/{res.id}/purge",
                method="POST",
                body=urlencode({"_xsrf": found.group(1)}).encode(),
                headers={
                    "Cookie": f"_xsrf={xsrf.value}",
                    "Content-Type": "application/x-www-form-urlencoded",
                    **headers,
                },
            )

        # When a POST with the right token comes from another site, it is refused
        for headers in (
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Origin": f"http://{own}.evil.example"},
            {"Referer": "http://evil.example/page"},
            {"Origin": f"http://{own}", "Referer": "http://evil.example/page"},
        ):
            reply = purge(**headers)
            assert reply.status == 403, headers
            no_markup(reply)
            assert r.exists(record), headers
        # And from the page's own host it goes through
        assert purge(Origin=f"http://{own}", Referer=f"{base}/saga/{res.id}").status == 302
        assert not r.exists(record)


# -- X-Real-Ip / X-Forwarded-* --------------------------------------------------


def _served_once(app: Celery, settings: WebSettings, headers: dict[str, str]) -> Reply:
    """``serve`` itself, in this (the main) thread: a request from a thread, then SIGINT stops it.

    A second request follows, so that the first one's access log line is
    written (after its answer is sent) before the signal comes.
    """
    port, replies = free_port(), []

    def client() -> None:
        try:
            replies.append(fetch(f"http://127.0.0.1:{port}/metrics", headers=headers))
            fetch(f"http://127.0.0.1:{port}/metrics?second")
        finally:
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    serve(app, "127.0.0.1", port, settings, ready=lambda: threading.Thread(target=client, daemon=True).start())
    assert len(replies) == 1
    return replies[0]


def test_forwarded_headers_are_trusted_only_behind_a_proxy(app: Celery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tornado.access")
    spoofed = {"X-Real-Ip": "203.0.113.7", "X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    # Without --behind-proxy, the access log has the real peer, not what the client claims
    assert _served_once(app, WebSettings(), spoofed).status == 200
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "tornado.access"]
    assert logged and "(127.0.0.1)" in logged[0] and "203.0.113.7" not in logged[0], logged
    # With it, the proxy's word is taken
    caplog.clear()
    assert _served_once(app, WebSettings(behind_proxy=True), spoofed).status == 200
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "tornado.access"]
    assert logged and "(203.0.113.7)" in logged[0], logged


# -- limit and page ------------------------------------------------------------


def _bulk_records(r, prefix: str, count: int) -> list[str]:
    """``count`` COMPLETED records and their index entries, written directly (no worker needed for a list)."""
    keys, now = Keys(prefix), int(store_now(r) * 1000)
    ids = [f"bulk-{i:04d}" for i in range(count)]
    pipe = r.pipeline(transaction=False)
    for i, saga_id in enumerate(ids):
        at = now - i
        pipe.hset(keys.record(saga_id), mapping={"status": "COMPLETED", "name": "bulk", "status_at": at, "created": at})
        pipe.zadd(keys.name_index(keys.shard_of(saga_id), "bulk", "COMPLETED"), {saga_id: at})
        pipe.sadd(keys.names(keys.shard_of(saga_id)), "bulk")
    pipe.execute()
    return ids


def test_limit_is_capped_and_page_is_bounded(app: Celery, r, prefix) -> None:
    ids = _bulk_records(r, prefix, 502)
    with web_server(app) as base:
        # limit: at most 500 sagas, however many are asked for
        for asked in ("501", "100000", "1" + "0" * 40):
            reply = fetch(f"{base}/api/sagas?limit={asked}")
            assert reply.status == 200 and len(reply.json()["sagas"]) == 500, asked
        assert [s["id"] for s in fetch(f"{base}/api/sagas?limit=3").json()["sagas"]] == ids[:3]
        for bad in ("0", "-1", "x", "9" * 5000):
            assert fetch(f"{base}/api/sagas?limit={bad}").status == 400, bad
        # page: 1 up to 10,000 sagas deep (200 pages of 50); outside that, a 400 that says so
        last = fetch(f"{base}/?page=11")
        assert last.status == 200 and re.findall(r'<tr data-id="([^"]+)"', last.body) == ids[500:]
        assert fetch(f"{base}/?page=200").status == 200
        for bad in ("0", "-3", "201", "1" + "0" * 30, "x"):
            reply = fetch(f"{base}/?page={bad}")
            assert reply.status == 400 and "page must be" in reply.body, (bad, reply.body)
        # And time filters too large to compute are a 400, not a 500
        for since in ("99999999999999w", "9" * 400 + "s"):
            assert fetch(f"{base}/?" + urlencode({"since": since})).status == 400, since
            assert fetch(f"{base}/api/sagas?" + urlencode({"since": since})).status == 400, since


# -- corrupt records -----------------------------------------------------------


def test_a_corrupt_record_is_a_row_not_a_broken_page(app: Celery, r, prefix, worker, sagas) -> None:
    keys = Keys(prefix)
    with worker():
        runs = [sagas.sequential.delay(order_id=i) for i in (1, 2, 3)]
        for res in runs:
            res.get(timeout=patience(30))
    healthy, bad_status, bad_packing = (res.id for res in runs)
    # Given one record with a status that is none, and one whose packed fields are cut
    r.hset(keys.record(bad_status), "status", "NOPE")
    assert r.hexists(keys.record(bad_packing), "zn")  # a finished record is packed (store/compact.py)
    r.hset(keys.record(bad_packing), "z1", "no length here")
    with web_server(app, WebSettings(enable_actions=True)) as base:
        # Then the list shows each as a "corrupt record" row, and the healthy saga as usual
        for path in ("/", "/?status=COMPLETED", "/?name=order_seq"):
            reply = fetch(base + path)
            assert reply.status == 200, (path, reply.body)
            rows = dict(re.findall(r'<tr data-id="([^"]+)" data-status="([^"]+)"', reply.body))
            assert rows == {healthy: "COMPLETED", bad_status: "CORRUPT", bad_packing: "CORRUPT"}, path
            assert reply.body.count("corrupt record") >= 2
        # And the API lists them with their id and an error
        reply = fetch(base + "/api/sagas")
        assert reply.status == 200
        listed = {s["id"]: s for s in reply.json()["sagas"]}
        assert set(listed) == {healthy, bad_status, bad_packing}
        assert "corrupt" not in listed[healthy]
        for saga_id in (bad_status, bad_packing):
            assert listed[saga_id]["corrupt"] is True and "corrupt" in listed[saga_id]["error"]
            assert saga_id in listed[saga_id]["error"]
        # And its own page and JSON say so (with Purge, to clean up), and the search finds it
        page = fetch(f"{base}/saga/{bad_packing}")
        assert page.status == 500 and "corrupt" in page.body and "Traceback" not in page.body
        assert f'action="/saga/{bad_packing}/purge"' in page.body
        api = fetch(f"{base}/api/sagas/{bad_packing}")
        assert api.status == 500 and api.json()["id"] == bad_packing and api.json()["corrupt"] is True
        found = fetch(f"{base}/?q={bad_packing}")
        assert found.status == 302 and found.headers["Location"] == f"/saga/{bad_packing}"


# -- the store down ------------------------------------------------------------


def test_an_unavailable_store_is_a_503_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    # Given a saga store nobody listens on (its URL with a password)
    app = Celery("web-down", broker="memory://", set_as_current=False)
    app.conf.update(saga_redis_url=f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0", saga_key_prefix="sagaweb-down")
    try:
        with web_server(app) as base:
            for path in ("/", "/api/sagas", "/saga/x"):
                reply = fetch(base + path)
                # Then each page says so, as a 503 (try again later), without the password ...
                assert reply.status == 503 and "unreachable" in reply.body, (path, reply.body)
                assert "s3cret-pw" not in reply.body
        # ... and the log has one line for it, not a traceback
        errors = [rec for rec in caplog.records if rec.name == "tornado.application"]
        assert errors and all(rec.exc_info is None and "s3cret-pw" not in rec.getMessage() for rec in errors)
    finally:
        app.close()
