"""How the process meets its shell: Ctrl-C pressed twice, and a standard error whose reader may have gone.

No torch import here: ``cli.main`` uses it before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any, Iterator, Optional


class QuietStderr:
    """``sys.stderr``, except that once its reader has gone (EPIPE) what is written there is dropped.

    Progress, warnings and the error line are for a person; when nobody reads them any more, the answer on stdout
    and the exit code still count (Python would otherwise end the run with exit 1).
    """

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        """Point the file descriptor at /dev/null: what is buffered and what comes later goes nowhere, quietly."""
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


GRACE_S = 2.0  # after a Ctrl-C, further ones are ignored this long
_last_interrupt = -GRACE_S


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C raises KeyboardInterrupt, except within ``GRACE_S`` of the last one: while llmsample completes its
    output and removes what it half-built, a second quick Ctrl-C would break that off with a traceback. Later ones
    interrupt again (a library that swallowed the first, as some imports do, cannot make Ctrl-C useless)."""
    global _last_interrupt
    now = time.monotonic()
    if now - _last_interrupt < GRACE_S:
        return
    _last_interrupt = now
    deliver(KeyboardInterrupt)


_held: list[Optional[type]] = []  # one entry per open ``signals_held`` block: the signal's exception, once one came


def deliver(exception: type) -> None:
    """Raise ``exception`` from a signal handler now, or at the end of the ``signals_held`` block it came in."""
    if _held:
        _held[-1] = _held[-1] or exception
        return
    raise exception()


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM that come inside the block take effect at its end, not in its middle.

    Python runs a handler in the main thread wherever that thread is, whichever thread the kernel gave the signal
    to (torch's workers can take one), so masking signals in the main thread is not enough; the handlers ask here.
    """
    _held.append(None)
    try:
        yield
    finally:
        pending = _held.pop()
    if pending is not None:
        deliver(pending)


def was_interrupted() -> bool:
    """Whether Ctrl-C was pressed during this command (a library may have swallowed its KeyboardInterrupt and failed
    otherwise later, as an import broken off halfway does)."""
    return _last_interrupt >= 0


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """For the length of one command: quick repeated Ctrl-C count once, and a closed stderr is dropped quietly."""
    global _last_interrupt
    _last_interrupt = -GRACE_S
    saved_stderr = sys.stderr
    if sys.stderr is not None and not isinstance(sys.stderr, QuietStderr):
        sys.stderr = QuietStderr(sys.stderr)
    try:
        previous = signal.signal(signal.SIGINT, _interrupt)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        sys.stderr = saved_stderr


def exit_quietly_on_sigint(code: int) -> None:
    """After the command: a Ctrl-C while Python joins threads at exit ends the process at once, instead of printing
    "Exception ignored in threading._shutdown"."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()

    def now(signum: int, frame: Any) -> None:
        os._exit(code or 130)

    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, now)


_IMPORTED_AT = time.monotonic()


def seconds_since_start() -> float:
    """How long this process has run: from its start in the kernel's records (Linux), else from this module's
    import (which the command line does first). ``--stats`` counts loading from here: what a person waits for.
    """
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/stat", "rb") as file:
            fields = file.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, clock ticks after boot
        with open("/proc/uptime", "rb") as file:
            uptime = float(file.read().split()[0])
        if 0 <= uptime - started < 86400 * 365:
            return round(uptime - started, 2)  # both counted in hundredths: no float noise past them
    return time.monotonic() - _IMPORTED_AT
