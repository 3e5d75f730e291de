"""How the process meets its shell: Ctrl-C once, and a standard error whose reader may have gone.

No torch import here: ``cli.main`` uses it before anything else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from typing import Any, Iterator


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


def _interrupt_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C interrupts (KeyboardInterrupt); later ones, while llmsample completes its output and
    removes what it half-built, are ignored, instead of breaking that off with a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """For the length of one command: Ctrl-C interrupts once, and a closed stderr is dropped quietly."""
    saved_stderr = sys.stderr
    if sys.stderr is not None and not isinstance(sys.stderr, QuietStderr):
        sys.stderr = QuietStderr(sys.stderr)
    try:
        previous = signal.signal(signal.SIGINT, _interrupt_once)
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
