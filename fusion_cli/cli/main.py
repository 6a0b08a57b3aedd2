"""Entry point of `fusion`: builds the Typer app from the command modules and turns
library errors into one line on stderr with exit code 2 (a traceback only with --debug)."""

from __future__ import annotations

import _thread
import contextlib
import errno
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import typer

from fusion_cli import __version__, notices
from fusion_cli.errors import FusionError, Terminated, is_out_of_memory

app = typer.Typer(
    name="fusion",
    help="Fuse remote-sensing images with FusionMamba: pansharpening, hyperspectral pansharpening, HISR.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: what the help texts say is printed as written (markdown ate `*` and `_`,
    # rich markup would eat `[...]`), and `\b` paragraphs keep their line breaks.
    rich_markup_mode=None,
)

# Typer ships its own copy of click in recent versions: find click's base exception through a public
# Typer class rather than importing either click.
_ClickException: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusion-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
) -> None:
    _state["debug"] = debug


def _register() -> None:
    # Every module of this package that defines `register(app)` is a command; discovering them
    # keeps this file free of per-command edits.
    import importlib
    import pkgutil

    import fusion_cli.cli as pkg

    if getattr(app, "_fusion_registered", False):
        return
    for mod in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if mod.name in {"main", "common"}:
            continue
        module = importlib.import_module(f"fusion_cli.cli.{mod.name}")
        if hasattr(module, "register"):
            module.register(app)
    app._fusion_registered = True  # type: ignore[attr-defined]


_signals: list[int] = []  # termination signals received by this process
_interrupts: list[int] = []  # Ctrl-Cs received by this process


def _raise_terminated(signum: int, _frame: object) -> None:
    _signals.append(signum)
    raise Terminated(signum)


def _raise_interrupt(signum: int, _frame: object) -> None:
    _interrupts.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's kill, `timeout`) and SIGHUP (a closed terminal) unwind like Ctrl-C,
    so the writers' cleanup runs; the previous handlers come back afterwards (the CLI may be
    called in-process, by tests). Python only lets the main thread install handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where it is ignored (`cmd &`)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def _c_stderr_quiet(enabled: bool) -> Iterator[None]:
    """Keep what C libraries print straight to the process's stderr (libtiff's default error
    handler writes a line per failed block when a disk fills up: dozens of lines before ours) out
    of the user's terminal; the tool says what failed in one line. Python's own stderr (our
    messages, progress, warnings) still goes to the terminal. Only when stderr is the real file
    descriptor 2 (not under a test's capture), and not with --debug."""
    try:
        real = enabled and sys.stderr is not None and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # a replaced stderr without a descriptor
        real = False
    if not real:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_err = sys.stderr
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1, encoding=python_err.encoding,
                               errors=python_err.errors)  # fmt: skip
        try:
            yield
        finally:
            sys.stderr.flush()
            sys.stderr.close()
            sys.stderr = python_err
            os.dup2(saved, 2)
            os.close(saved)


def bound_heap() -> None:
    """Fixed glibc malloc thresholds for the process (a process-wide setting, so the entry point's,
    not the library's). Left dynamic, glibc raises its mmap threshold after large frees and keeps
    ever more freed memory, so peak RSS drifts with the run's length. Fixed at 32 MiB (mmap),
    tile-sized arrays (a few MB) are reused from the heap instead of being mapped, zero-filled by
    page faults and unmapped on every call (that cost a 4 Mpx classical run ~0.9 M page faults and a
    third of its time). Larger arrays come from the heap too (no mmap'd chunks): a network window
    allocates 0.1-0.6 GB arrays in every block, and each mapped one was unmapped again on free (a TLB
    shootdown across the threads) and zero-filled by page faults on the next block: the kernel's
    share was a third of a 1024^2 official run's CPU time (sys 25 s of 71), 2.5 s of 54 from the heap.
    The trim threshold (1 GiB) is above those arrays, so the heap top they free is kept for the next
    block and window instead of being returned and faulted in again: at 64 MiB, a 6 Mpx `landsat`
    run at tile 768 spent 26 s in the kernel (141 s wall), at 1 GiB 4 s (111 s; 2 GiB: 109 s); at
    tile 1024 (2 GiB), 46 s and 143 s against 10 s and 102 s. The memory kept is what the run already
    peaked at: 8k-scene pass-through peak +22 % over 2k (+14 % at 64 MiB; limit +25 %, bench_pipeline)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap'd chunks
    except (OSError, AttributeError):
        pass


def share_cores() -> None:
    """Idle OpenMP threads (torch's and numba's) spin only briefly before they sleep, unless the user
    set OMP_WAIT_POLICY. Left to spin (libgomp's default, 300k spins), two networks fusing at once on
    two cores spun against each other (official checkpoint, 1024^2 WV3 crop: 25 s alone, 60 s each
    for two at once). Sleeping at once (PASSIVE) fixed that but cost training 1.8x: a training step
    runs ~5,000 small ops, and each woke its threads from sleep (`hyperion_hisr`, d = 16, batch 16:
    2.6 s a step against 1.4 s). 1,000 spins (a few microseconds, GOMP_SPINCOUNT) bridge the gaps
    between one op and the next and keep both: the step 1.4 s, the two fusions at once as fast as
    with PASSIVE, inference alone unchanged. KMP_BLOCKTIME=0 keeps the other OpenMP runtimes (LLVM,
    Intel) sleeping at once, as before. Read when the runtimes start: set before torch is imported."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
    os.environ.setdefault("KMP_BLOCKTIME", "0")


# OS errors that say the path given cannot be used (a read-only file system, no permission), as
# opposed to the system failing under a valid one (ENOSPC, EIO)
_PATH_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.ELOOP)


def main(argv: list[str] | None = None) -> None:
    bound_heap()
    share_cores()
    _register()
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if argv is None and not debug:  # the process is ours (`fusion`, `python -m fusion_cli`)
        sys.unraisablehook = _interrupt_hook(sys.unraisablehook)
    # the command's warnings are printed as they come (-q holds them back) and --json lists them
    with notices.collected(echo=_print_warning), _c_stderr_quiet(not debug), _one_line_warnings(not debug):
        _main(argv, debug)


def _print_warning(message: str) -> None:
    typer.echo(f"Warning: {message}", err=True)


_exiting: list[int] = []  # set once "Interrupted." is printed: the process is on its way out


def _interrupt_hook(default: Callable[[Any], object]) -> Callable[[Any], object]:
    """A Ctrl-C landing in a callback from C (numba's compiler through ctypes) or in an exit handler
    (torch's) is "ignored" by Python with a traceback on stderr: after "Interrupted." it printed
    screens of them, and before it the run went on. Before, the interrupt is raised again where the
    main flow resumes; after, it is dropped: the run has already unwound. Other such errors after
    an interrupt are its by-products (llvmlite's half-built objects): dropped too."""

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not isinstance(exc, KeyboardInterrupt):
            if not (_interrupts or _signals or _exiting):
                default(unraisable)
        elif not _exiting:
            # delivered again from another thread a moment later, once this hook has returned (sent
            # from here, it would be raised inside the hook and "ignored" once more)
            signum = getattr(exc, "signum", signal.SIGINT)
            threading.Timer(0.001, _thread.interrupt_main, (signum,)).start()

    return hook


@contextlib.contextmanager
def _one_line_warnings(enabled: bool) -> Iterator[None]:
    """Warnings as one line, as errors are ("Warning: ..."), not Python's file, line and source line;
    restored afterwards (the CLI may be called in-process)."""
    import warnings

    previous, shown = warnings.formatwarning, warnings.showwarning

    def show(
        message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        if notices.collecting():  # the command's thread: one of its messages (-q, --json)
            notices.notify(str(message))
        else:
            shown(message, category, filename, lineno, file, line)

    if enabled:
        warnings.formatwarning = lambda message, *_args, **_kwargs: f"Warning: {message}\n"
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.formatwarning, warnings.showwarning = previous, shown


def _main(argv: list[str] | None, debug: bool) -> None:
    as_json = "--json" in (argv if argv is not None else sys.argv[1:])

    def fail(message: str, code: int) -> NoReturn:
        """One `Error:` line on stderr and the exit code; with --json also a JSON document on stdout
        (a script parsing stdout got nothing on a refused run)."""
        typer.echo(f"Error: {message}", err=True)
        if as_json:
            from fusion_cli.cli.common import echo_json  # adds the warnings given so far

            echo_json({"error": message, "exit_code": code})
        sys.exit(code)

    try:
        with _signals_as_interrupt():
            try:
                # standalone_mode=False: usage errors come back here and are told in one line
                code = app(args=argv, prog_name="fusion", standalone_mode=False)
            except _ClickException as exc:
                _usage_error(exc, fail)
            except typer.Abort:  # end of input at a prompt
                typer.echo("Aborted.", err=True)
                sys.exit(1)
            # Typer turns any KeyboardInterrupt (ours included) into exit 130: say which signal
            if code == 130 or (_signals and code == 128 + _signals[-1]):  # batch's summary says which
                raise Terminated(_signals[-1]) if _signals else KeyboardInterrupt from None
            sys.exit(code if isinstance(code, int) else 0)  # as click's standalone mode does
    except FusionError as exc:
        _traceback_if(debug)
        fail(str(exc), 2)
    except OSError as exc:
        _traceback_if(debug)
        # a path the user chose and cannot use is bad input (exit 2); an OutputWriteError keeps the
        # OS error it reports as its cause
        # (only an OSError's errno: a GDAL error's `errno` is its error class, CPLE_AppDefined = 1 = EPERM)
        cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
        if exc.errno in _PATH_REFUSED or (cause is not None and cause.errno in _PATH_REFUSED):
            fail(f"{exc}; choose a path you can read and write, or fix its permissions", 2)
        # the system, not the input: a full disk, a lost mount, an I/O error
        fail(f"{exc} (check the disk space and permissions, then rerun)", 1)
    except (MemoryError, RuntimeError) as exc:
        if _is_symlink_loop(exc):  # Path.resolve() on Python < 3.13: bad input, not a crash
            _traceback_if(debug)
            fail(f"{exc}; point the path at a file, not at a loop of symlinks", 2)
        # out of memory: numpy's MemoryError, torch's "can't allocate memory" (CPU) and
        # OutOfMemoryError "CUDA out of memory" (a RuntimeError)
        if not is_out_of_memory(exc):
            raise
        _traceback_if(debug)
        fail(
            "out of memory; free memory and rerun (pansharpen, hisr, batch, train: a smaller --tile or "
            "--batch; metrics, report and evaluate read the images whole: score a crop)",
            1,
        )
    except KeyboardInterrupt as exc:
        _exiting.append(1)
        signum = getattr(exc, "signum", signal.SIGINT)
        typer.echo("Interrupted." if signum == signal.SIGINT else f"Terminated by signal {signum}.", err=True)
        sys.exit(128 + signum)


def _is_symlink_loop(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop from ")


def _traceback_if(debug: bool) -> None:
    """--debug adds the traceback of the error being handled; the one-line message and the exit code
    stay what they are without it (scripts test the code)."""
    if debug:
        traceback.print_exc()


def _usage_error(exc: Exception, fail: Callable[[str, int], NoReturn]) -> None:
    """A bad invocation (unknown option, missing argument, a value not among the choices): one line
    `Error: ... (see 'fusion CMD --help')` on stderr and exit 2, like the library's errors; `fusion`
    alone prints the help."""
    exit_code = getattr(exc, "exit_code", 2)
    if type(exc).__name__ == "NoArgsIsHelpError":  # the help, printed as the message
        exc.show()  # type: ignore[attr-defined]
        sys.exit(exit_code)
    message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    fail(f"{message}{hint}", exit_code)
