"""A TCP proxy that delays every byte by a fixed time each way: a server "a network hop away", on loopback.

``python benchmarks/delay_proxy.py --target 127.0.0.1:6379 --delay-ms 0.5``
listens on a free loopback port, prints ``listening on <port>`` once it
does, and forwards each connection to the target, holding every chunk for
``--delay-ms`` before it passes it on, in both directions: a round trip
through it takes ``2 x delay`` more. Bytes keep their order, and nothing
limits bandwidth: only latency is added, as a network hop adds it.

It is asyncio on a ``select()`` loop: epoll and poll take their timeouts in
whole milliseconds, so an event loop on either could not hold a chunk for
0.25 ms; select() takes microseconds. ``overhead.py --rtt-ms`` runs one in
its own process (its CPU is not the publisher's) and measures what it really
adds with PING, through it and around it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import selectors
import signal
import sys

CHUNK = 65536


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk ``delay`` seconds after it arrived, in order."""
    loop = asyncio.get_running_loop()
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await held.get()
            if not data:
                break
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    sender = asyncio.ensure_future(deliver())
    try:
        while True:
            data = await reader.read(CHUNK)
            held.put_nowait((loop.time() + delay, data))
            if not data:
                break
        await sender
    finally:
        sender.cancel()
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(target: tuple[str, int], delay: float, port: int) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pump(client_r, server_w, delay), _pump(server_r, client_w, delay), return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", required=True, help="host:port to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="added to each direction (ms)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    # Nothing to flush or close: a proxy stopped mid-copy is a network cut, which is all it models.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    loop = asyncio.SelectorEventLoop(selectors.SelectSelector())
    try:
        loop.run_until_complete(_serve((host, int(port)), args.delay_ms / 1000, args.port))
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
