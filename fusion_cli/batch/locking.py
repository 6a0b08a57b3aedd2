"""One writer per output across runs: a per-output flock, and removal of a killed writer's temporaries."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fusion_cli.signals import deferred_signals

# Seconds between tries when waiting for another run's lock (`scene_lock(wait=...)`).
WAIT_POLL_S = 0.5


@contextlib.contextmanager
def scene_lock(out: Path, wait: float = 0.0) -> Iterator[bool]:
    """Hold an exclusive lock on one output while it is made; yields False if another live run
    holds it (an overlapping cron run, a duplicate array task) for more than `wait` seconds (0: at
    once; inf: it is waited for until it lets go), polling, so Ctrl-C still stops the wait.

    flock is released by the kernel when its holder dies, so a lock we obtain proves that any
    temporary file left beside the output belongs to a killed run and may be removed.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no cross-run exclusion, nothing else changes
        yield True
        return
    lock_path = lock_file(out)
    fd: int | None = None
    deadline = time.monotonic() + wait
    try:  # one try from the file's creation on, so Ctrl-C at any point leaves no lock file
        while True:
            with deferred_signals():  # a signal cannot land between os.open and `fd =`
                # never through a link: its target (anywhere) would be created, then kept
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
                held = _try_flock(fcntl, fd, lock_path)
                if held or (held is False and time.monotonic() >= deadline):
                    break
                # None: the holder we waited on unlinked the file (lock the live one); False: wait
                _release_lock_file(fcntl, fd, lock_path)
                fd = None
            if held is False:
                time.sleep(WAIT_POLL_S)
        yield held
    finally:
        if fd is not None:
            with deferred_signals():  # a release cut in two would leave the lock file behind
                _release_lock_file(fcntl, fd, lock_path)


def lock_file(out: Path) -> Path:
    """The lock file of output `out`: `.<name>.lock` beside it."""
    return out.with_name(f".{out.name}.lock")


def _try_flock(fcntl: Any, fd: int, lock_path: Path) -> bool | None:
    """True: `fd` holds the live lock file; False: another run holds it; None: retry."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some NFS mounts): no cross-run exclusion
        return True
    try:
        return True if _is_live(fd, lock_path) else None
    except FileNotFoundError:
        return None


def _is_live(fd: int, lock_path: Path) -> bool:
    """`fd` is the file now at `lock_path` (not one a previous holder unlinked)."""
    return os.fstat(fd).st_ino == os.stat(lock_path).st_ino


def _release_lock_file(fcntl: Any, fd: int, lock_path: Path) -> None:
    """Unlink the lock file unless another live run holds it, then close `fd`.

    Re-locking is a no-op for the holder; for a run that was refused (or interrupted while
    acquiring) it succeeds only when nobody holds the file, so a live run's lock is never removed.
    """
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        except OSError:  # no locks on this filesystem: nothing to protect
            pass
        with contextlib.suppress(OSError):
            if _is_live(fd, lock_path):
                lock_path.unlink()
    finally:
        os.close(fd)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporaries killed writers left beside `out`, another host's included (call under
    `scene_lock`: no other batch writes this output; `raster.remove_stale_temporaries`)."""
    from fusion_cli.raster import remove_stale_temporaries as remove

    return remove(out, any_host=True)
