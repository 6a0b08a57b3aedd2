"""Holding Ctrl-C (and SIGTERM/SIGHUP) over bookkeeping that must not stop halfway.

Python raises KeyboardInterrupt between any two bytecodes of the main thread. Most of the tool
is written to unwind cleanly from there (the writers remove their temporaries), but a few short
sections leave shared state broken if cut in two: a lock file's removal, and rasterio's
per-thread GDAL environment stack, whose `Env.__exit__` clears the environment and only then
restores its parent (cut between the two, every outer `Env.__exit__` raises "No GDAL
environment exists", which used to replace the interrupt with an error). Those sections run
under `deferred_signals()`: a signal received meanwhile is delivered as soon as they end.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# SIGHUP does not exist on Windows
HELD = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Run the block with SIGINT/SIGTERM/SIGHUP held; re-deliver them, in order, when it ends.

    Only the main thread receives Python signals (and may install handlers), so elsewhere this
    does nothing. Handlers installed from C (not visible to Python) are left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, _frame: object) -> None:
        received.append(signum)

    previous = {}
    for s in HELD:
        handler = signal.getsignal(s)
        if handler is None or handler == signal.SIG_IGN:
            continue
        previous[s] = handler
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:  # the restored handler runs here (raise_signal checks at once)
            signal.raise_signal(s)


def interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or `Terminated`) that was being handled when `exc` was raised, if
    any: a cleanup step failed on the way out, and the run was still interrupted."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return cur
        seen.add(id(cur))
        cur = cur.__context__
    return None


class ThreadPool(ThreadPoolExecutor):
    """A ThreadPoolExecutor whose `submit` runs with Ctrl-C held (`deferred_signals`).

    `submit` starts a new worker thread and waits for it to run; a Ctrl-C landing in that wait left
    the thread started but not yet in the pool's list, so `shutdown(wait=True)` did not wait for it:
    it went on with the queued write (or read) after the dataset was closed, and GDAL crashed the
    exiting process (SIGSEGV / SIGABRT, about 1 run in 60 interrupted on a loaded machine). Held,
    the interrupt comes once the thread is known to the pool, whose shutdown then waits for it.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        with deferred_signals():
            return super().submit(fn, *args, **kwargs)
