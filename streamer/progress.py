"""Progress of a long job: a bar on a terminal, a log line now and then otherwise.

On a terminal the bar is redrawn in place on stderr at most ten times a second. Anywhere else
(a pipe, a file, a container's log) a structured line `<task> progress` (done, total, percent,
rate, seconds left) is logged every `interval` seconds, so a job that runs for minutes is never
silent, and a closing line gives the total.

A step that cannot count its work (a model fit) gets a `Heartbeat` instead: its elapsed
seconds, in place on a terminal, or a log line every `interval` seconds anywhere else.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, TextIO

import structlog

log = structlog.get_logger(__name__)

REDRAW_SECONDS: Final = 0.1
DEFAULT_INTERVAL_SECONDS: Final = 10.0
TICK_SECONDS: Final = 1.0
"""How often a heartbeat redraws its seconds on a terminal: it shows whole seconds."""


class Progress:
    """Report `done` of `total` for `task`; call `update` as often as you like, then `close`."""

    def __init__(
        self,
        task: str,
        total: int,
        *,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        width: int = 30,
    ) -> None:
        self._task = task
        self._total = max(total, 0)
        self._stream = sys.stderr if stream is None else stream
        self._on_terminal = self._stream.isatty()
        self._interval = REDRAW_SECONDS if self._on_terminal else interval
        self._width = width
        self._started = time.monotonic()
        self._next = self._started + self._interval
        self._done = 0

    @property
    def on_terminal(self) -> bool:
        return self._on_terminal

    def update(self, done: int, *, force: bool = False) -> None:
        self._done = done
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._interval
        rate = done / max(now - self._started, 1e-9)
        if self._on_terminal:
            filled = int(self._width * min(done, self._total) / max(self._total, 1))
            self._stream.write(
                f"\r[{'#' * filled}{'.' * (self._width - filled)}] {done:,}/{self._total:,}"
                f"  {rate:,.0f}/s "
            )
            self._stream.flush()
            return
        left = (self._total - done) / rate if rate > 0 and done < self._total else 0.0
        log.info(
            f"{self._task} progress",
            done=done,
            total=self._total,
            percent=round(100 * done / self._total, 1) if self._total else 100.0,
            per_second=round(rate, 1),
            seconds_left=round(left, 1),
        )

    def close(self) -> None:
        """End the bar's line on a terminal; log the final count elsewhere."""
        if self._on_terminal:
            self.update(self._done, force=True)
            self._stream.write("\n")
            self._stream.flush()
            return
        seconds = time.monotonic() - self._started
        log.info(
            f"{self._task} done",
            done=self._done,
            total=self._total,
            seconds=round(seconds, 2),
            per_second=round(self._done / max(seconds, 1e-9), 1),
        )


class Heartbeat:
    """While a `with` block runs, say that it still runs and for how long.

    For a step that cannot report its own progress (scikit-learn's HistGradientBoosting has no
    per-iteration callback). A thread of its own wakes every `interval` seconds (`TICK_SECONDS`
    on a terminal): on a terminal it redraws "<event> (<field values>): N s" in place on the
    stream, and ends the line when the block ends; anywhere else it logs `event` with `seconds`
    and `fields`. A block shorter than the interval shows nothing. The thread only reads the
    clock and writes; the step itself is left alone. The caller logs what starts and what ends.
    """

    def __init__(
        self,
        event: str,
        *,
        stream: TextIO | None = None,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        **fields: Any,
    ) -> None:
        self._event = event
        self._fields = fields
        self._stream = sys.stderr if stream is None else stream
        self._on_terminal = self._stream.isatty()
        self._interval = TICK_SECONDS if self._on_terminal else interval
        self._clock = clock
        self._started = math.nan
        """When the block began: set as it is entered."""
        self._drawn = False
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat: {event}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._started = self._clock()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stopped.set()
        self._thread.join()
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval):
            self.beat()

    def beat(self) -> None:
        """Show the seconds since the block began (the thread calls this every interval)."""
        seconds = self._clock() - self._started
        if self._on_terminal:
            what = f" ({', '.join(map(str, self._fields.values()))})" if self._fields else ""
            self._stream.write(f"\r{self._event}{what}: {seconds:,.0f} s ")
            self._stream.flush()
            self._drawn = True
            return
        log.info(self._event, seconds=round(seconds), **self._fields)
