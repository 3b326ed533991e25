"""The private ``redis-server`` the tests and the demo start: it must never mistake another server for its own.

Two servers whose ports were chosen before either started can be handed
the same free port; the loser's PING would then reach the winner, and a
test would run against a server it does not control (a sentinel that
could not bind once waited 20 s on the replica's port).
"""

from __future__ import annotations

import pytest
import redis

from celery_saga.redis_server import RedisServer, free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_server_whose_chosen_port_was_taken_starts_on_another_one() -> None:
    # Given a server that chose a port, and another server that took it first
    with RedisServer() as first:
        late = RedisServer()
        late.port = first.port  # as if both had been handed the same free port
        # When the late one starts
        try:
            late.start()
            # Then it runs on a port of its own, and answers there as itself
            assert late.port != first.port
            assert late.proc is not None
            with redis.Redis(port=late.port) as client:
                assert int(client.info("server")["process_id"]) == late.proc.pid
            with redis.Redis(port=first.port) as client:
                assert first.proc is not None
                assert int(client.info("server")["process_id"]) == first.proc.pid
        finally:
            late.stop()


def test_a_server_on_a_given_port_that_is_taken_fails_rather_than_use_the_other() -> None:
    # Given a server on a port, and a second one asked for that very port
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        # When it starts, then it says the port is taken instead of answering as the first
        with pytest.raises(RuntimeError, match="redis-server exited"):
            second.start()
        assert second.proc is None


def test_a_restart_keeps_the_port_its_clients_know() -> None:
    server = RedisServer(persist=True)
    server.start()
    try:
        port = server.port
        with redis.Redis(port=port) as client:
            client.set("kept", "1")
        server.stop()
        server.start()
        assert server.port == port
        with redis.Redis(port=port) as client:
            assert client.get("kept") == b"1"
    finally:
        server.stop()
