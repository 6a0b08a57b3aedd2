"""User-facing errors: one line that says what is wrong and what to do; the CLI exits 2."""

from __future__ import annotations

from collections.abc import Sequence


def short_list(items: Sequence[object]) -> str:
    """Items joined by commas; of more than 8, the first 4, "..." and the last 2 (a 128-band list is
    not one line)."""
    shown = list(items) if len(items) <= 8 else [*items[:4], "...", *items[-2:]]
    return ", ".join(map(str, shown))


def is_out_of_memory(exc: BaseException) -> bool:
    """numpy's MemoryError, torch's "can't allocate memory" (CPU) and "CUDA out of memory" (its
    OutOfMemoryError is a RuntimeError)."""
    message = str(exc)
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and ("allocate memory" in message or "out of memory" in message)
    )


class FusionError(Exception):
    """Bad input or usage. The message is shown to the user as is, without a traceback."""


class NoValidPixels(FusionError):
    """A method's scene statistics found no valid pixel: the inputs are all nodata where they meet."""

    def __init__(self) -> None:
        super().__init__(
            "no valid pixel to fuse: the inputs are all nodata (or masked) where they overlap; "
            "check the inputs and their nodata"
        )


class NegativeDN(FusionError):
    """The data hold negative DN that a fuser dividing by intensities (ratio methods, the networks)
    cannot take: `evaluate` leaves such methods out of a table it was not asked for by name."""


class OutputWriteError(OSError):
    """Writing an output failed (a full disk, a file-size limit, a lost mount): the system, not the
    input, so the CLI exits 1; the message names the output, and no file is left under its name."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where Ctrl-C would be so that the same cleanup runs (no partial
    file is left); the CLI exits 128 + `signum`."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum
