"""Warnings the tool gives about its inputs and results (a zero collar, an alpha band read as data, a
method left out), kept per thread while a run collects them, so the run reports them in its summary
and its JSON and `-q` can hold them back; outside a collection they are Python warnings, as a library
user expects. Python's own `warnings` are not thread-safe to catch (`catch_warnings` swaps global
state): concurrent batch scenes each collect their own here."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator

_local = threading.local()


class _Sink(list[str]):
    """A collection: its messages, and `echo`, which prints each as it comes (the CLI, unless -q or
    --json hold them back)."""

    echo: Callable[[str], None] | None = None


def notify(message: str) -> None:
    """Tell the user `message`: into this thread's collection (once), else as a UserWarning."""
    sink = getattr(_local, "sink", None)
    if sink is None:
        warnings.warn(message, stacklevel=3)
    elif message not in sink:
        sink.append(message)
        if sink.echo is not None:
            sink.echo(message)


@contextlib.contextmanager
def collected(echo: Callable[[str], None] | None = None) -> Iterator[list[str]]:
    """The messages `notify` is given in this thread within the block, in order, each once (`echo`
    is called with each as it comes); an enclosing collection does not see them (the block's owner
    reports them)."""
    outer = getattr(_local, "sink", None)
    sink = _Sink()
    sink.echo = echo
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = outer


def hold() -> None:
    """Stop echoing this thread's collection (-q, --json): its messages are only collected."""
    sink = getattr(_local, "sink", None)
    if sink is not None:
        sink.echo = None


def collecting() -> bool:
    """Whether this thread's messages are being collected."""
    return getattr(_local, "sink", None) is not None


def so_far() -> list[str]:
    """This thread's collected messages (none outside a collection)."""
    return list(getattr(_local, "sink", None) or [])
