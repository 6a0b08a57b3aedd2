"""Writing behind the fusion: GDAL compresses and writes one strip in a background thread while
the next strip is fused."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fusion_cli.signals import ThreadPool, deferred_signals


class WriteBehind:
    """Runs write calls in order in one background thread, at most `depth` behind, so that GDAL
    compresses and writes one strip while the next is fused. Only that thread touches the output
    meanwhile; leaving the context waits for every write and re-raises the first error."""

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.pending: deque[Future[None]] = deque()
        self.pool = ThreadPool(max_workers=1, thread_name_prefix="fusion-write")
        self.failed = False  # after a failed write the queued ones are skipped, not attempted

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except BaseException:
            self.failed = True
            raise

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self.pending.append(self.pool.submit(self._call, fn, *args))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # the output is closed next: Ctrl-C must not abandon this wait while the writing thread
        # still uses it (GDAL then crashed the process: exit 139); it is delivered once the queued
        # writes (at most `depth` strips) are done or dropped
        with deferred_signals():
            try:
                while self.pending:
                    fut = self.pending.popleft()
                    if exc_type is None:
                        fut.result()
                    else:  # already failing: just let the queued writes finish or be dropped
                        fut.cancel()
            finally:
                self.pool.shutdown(wait=True)
