"""A stage's writes to ``sys.stderr``, as the task's log records at INFO.

Why: Airflow 3's task supervisor logs everything a task prints on stderr at ERROR level (logger ``task.stderr``), and
the libraries a stage runs print their progress bars there (ctune's scorer, lm-eval's request loops, transformers'
weight loading: tqdm writes to ``sys.stderr``). Every successful scoring or evaluation then showed red ERROR lines in
the task's log. Inside :func:`stderr_as_log` those writes become INFO records of the operator's logger instead: a
bar, which redraws itself after a carriage return, is logged as its state every ``interval_s`` seconds and its last
one, so a long scoring shows that it is alive without a record per redraw. What is written to file descriptor 2
directly (a child process's own errors) is untouched and still reaches the log as an error; a stage's failure is an
exception, which Airflow logs as one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from typing import Any

PROGRESS_INTERVAL_S = 30.0  # a progress bar's state is logged at most this often while it runs


def last_state(line: str) -> str:
    """What a terminal would show of ``line``: its last piece after a carriage return, blank where a bar cleared
    itself (tqdm's ``leave=False`` overwrites its line with spaces)."""
    pieces = [piece for piece in line.split("\r") if piece]
    return pieces[-1].rstrip() if pieces else ""


class StderrLog(io.TextIOBase):
    """A text stream that logs each line it is written, and a progress bar's state now and then."""

    def __init__(self, logger: Any, interval_s: float) -> None:
        super().__init__()
        self._logger = logger
        self._interval_s = interval_s
        self._partial = ""  # written after the last newline: a bar being redrawn, or a line not finished yet
        self._last_logged = ""
        self._logged_at = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, partial = (self._partial + text).split("\n")
        for line in lines:
            self._log(last_state(line))
        if "\r" in partial:  # a bar redrawn: only its latest drawing matters (and the buffer stays small)
            state = last_state(partial)
            if time.monotonic() - self._logged_at >= self._interval_s:
                self._log(state)
            partial = state + "\r" if partial.endswith("\r") else state  # what comes next overwrites it
        self._partial = partial
        return len(text)

    def finish(self) -> None:
        """Log what is left after the last newline (a bar closed without one)."""
        self._log(last_state(self._partial))
        self._partial = ""

    def _log(self, state: str) -> None:
        if state and state != self._last_logged:  # a bar's final state follows its last timed one unchanged
            self._logger.info("%s", state)
            self._last_logged = state
        self._logged_at = time.monotonic()


@contextmanager
def stderr_as_log(logger: Any, interval_s: float = PROGRESS_INTERVAL_S) -> Iterator[StderrLog]:
    """Within the block, ``sys.stderr`` writes become INFO records of ``logger`` (anything with ``info(message,
    *args)``: an operator's ``self.log``, a :class:`logging.Logger`); see the module docstring."""
    stream = StderrLog(logger, interval_s)
    try:
        with redirect_stderr(stream):
            yield stream
    finally:
        stream.finish()
