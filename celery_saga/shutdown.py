"""How the long-running commands (``saga sweep``, ``saga web``) stop: at once, on SIGINT or SIGTERM.

A flag set by a signal handler is read only when the main thread comes back
to look at it, which a Redis call that waits (a paused server, a network
that drops packets, redis-py's retries against a store that is down) can
put off for its whole timeout. A handler that raises interrupts that call
instead: Python runs handlers between bytecodes and inside blocking socket
calls alike.

The handlers are installed, not inherited: a process started in the
background by a non-interactive shell (CI, ``nohup``, a deploy script)
inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["STOP_SIGNALS", "interrupted_by_signals", "stop_requested"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def interrupted_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while the block runs.

    A handler of its own, not ``signal.default_int_handler``: asyncio's runner
    replaces that one with a handler that only cancels a task, which waits
    for the loop to be free again.
    """
    previous = {sig: signal.signal(sig, _interrupt) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def stop_requested() -> Iterator[Callable[[], bool]]:
    """A check of whether SIGINT or SIGTERM came while the block runs, for work that must stop between items.

    A bulk action stops between two sagas, never inside one (a retry's
    transition written, its messages not yet sent). A second signal raises
    KeyboardInterrupt at once. Outside the main thread, where no handler can
    be installed, the check is always False.
    """
    asked: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        if asked:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        asked.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    try:
        yield lambda: bool(asked)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
