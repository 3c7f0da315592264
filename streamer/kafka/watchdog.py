"""A last resort against a Kafka client call that blocks far past its own timeout.

Every transactional call takes a timeout, yet librdkafka can block past it: once the broker that
coordinates the consumer group goes away, `send_offsets_to_transaction` may wait for minutes, or
until the process is killed (librdkafka issues #5456 and #5511). A scorer stuck there is alive
and does nothing, so a supervisor that restarts failed processes would never restart it.

The watchdog turns that hang into a failure. While a guarded call runs, a daemon thread waits; if
the call is still running `grace` seconds after its own timeout, the thread logs the error,
naming the call, and ends the process with exit status 1. The main thread is blocked inside C
code, where no Python exception can reach it, so the end is `os._exit`: the same as a crash,
which exactly-once processing is built to survive. The open transaction never commits; the
restarted scorer (same `STREAMER_INSTANCE_ID`) fences it, the coordinator aborts it, and scoring
resumes from the last committed offsets. Nothing is lost or repeated.

A call blocked because no broker answers at all is not hung: it goes on once a broker is back
(librdkafka retries its connections by itself). Given `cluster_answers`, the thread asks it, on
its own thread, every `OUTAGE_CHECK_SECONDS` once a call has run that long (a call normally takes
milliseconds); while no broker answers, the call waits, and its timeout and grace count again
from the last moment none did. So a scorer rides out the loss of every broker (the transaction
timeout then decides what becomes of the open transaction), and a call that stays blocked with
the brokers up still ends the process.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Final

import structlog

from streamer.errors import StalledError

log = structlog.get_logger(__name__)

STALL_GRACE_SECONDS: Final = 10.0
"""How far past its own timeout a guarded call may run before the process is ended."""
STALLED_EXIT_STATUS: Final = 1
"""The exit status of a process the watchdog ends: a failure, like any other fatal error."""
OUTAGE_CHECK_SECONDS: Final = 2.0
"""How often the watchdog asks whether a broker answers while a guarded call waits out an outage."""


@dataclass(frozen=True, slots=True)
class _Guarded:
    token: int
    what: str
    timeout: float
    started: float
    deadline: float
    next_check: float
    """When to ask next whether a broker answers (with `cluster_answers`)."""
    outage_seen: float | None = None
    """The last time the watchdog found no broker answering during this call."""
    checked: float | None = None
    """The last time the watchdog asked whether a broker answers, during this call."""


def exit_stalled(error: StalledError) -> None:
    """Log the stall and end the process at once (the main thread is blocked in C code)."""
    log.error("stopped", error=str(error), error_class=type(error).__name__)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(STALLED_EXIT_STATUS)


class Watchdog:
    """Watches one blocking call at a time; `on_stall` runs if one overruns its timeout + grace.

    The watching thread starts with the first guarded call and lives as long as the process (a
    daemon); `close` ends it, for tests.
    """

    def __init__(
        self,
        grace: float = STALL_GRACE_SECONDS,
        on_stall: Callable[[StalledError], None] = exit_stalled,
        cluster_answers: Callable[[], bool] | None = None,
        outage_check: float = OUTAGE_CHECK_SECONDS,
    ) -> None:
        if grace < 0:
            raise ValueError(f"grace must be >= 0, got {grace}")
        self.grace = grace
        self._on_stall = on_stall
        self._cluster_answers = cluster_answers
        """Whether any broker answers now; called on the watchdog's thread, may block briefly."""
        self._outage_check = outage_check
        self._condition = threading.Condition()
        self._guarded: _Guarded | None = None
        self._tokens = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextmanager
    def guard(self, what: str, timeout: float) -> Iterator[None]:
        """Watch the code in the `with` block, which should finish within `timeout` seconds."""
        with self._condition:
            if self._guarded is not None:
                raise RuntimeError(f"{what}: {self._guarded.what} is already guarded")
            self._tokens += 1
            started = time.monotonic()
            self._guarded = _Guarded(
                self._tokens,
                what,
                timeout,
                started,
                deadline=started + timeout + self.grace,
                next_check=started + self._outage_check,
            )
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._watch, name="streamer-watchdog", daemon=True
                )
                self._thread.start()
            self._condition.notify()
        try:
            yield
        finally:
            with self._condition:
                self._guarded = None
                self._condition.notify()

    @property
    def guarding(self) -> tuple[str, float] | None:
        """The call being guarded and the seconds it has run (None: none); any thread."""
        guarded = self._guarded
        if guarded is None:
            return None
        return guarded.what, time.monotonic() - guarded.started

    @property
    def waiting_for_brokers(self) -> bool:
        """Whether the guarded call is waiting out an outage: at the last check, no broker
        answered (any thread)."""
        guarded = self._guarded
        return guarded is not None and guarded.outage_seen == guarded.checked

    def close(self) -> None:
        """Stop watching and end the thread."""
        with self._condition:
            self._closed = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join()

    def _watch(self) -> None:
        reported = 0
        while True:
            with self._condition:
                while True:
                    if self._closed:
                        return
                    guarded = self._guarded
                    if guarded is None or guarded.token == reported:
                        self._condition.wait()
                        continue
                    due = guarded.deadline
                    if self._cluster_answers is not None:
                        due = min(due, guarded.next_check)
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
            if self._cluster_answers is not None and self._within_time(guarded):
                continue
            reported = guarded.token
            blocked = time.monotonic() - guarded.started
            self._on_stall(
                StalledError(
                    f"{guarded.what} has blocked for {blocked:.0f}s, {self.grace:.0f}s past its "
                    f"{guarded.timeout:.0f}s timeout (the Kafka client can hang when a "
                    "coordinator broker goes away: librdkafka #5456, #5511); ending the process "
                    "so that it can be restarted. Its open transaction is never committed: the "
                    "restarted scorer aborts it and resumes from the last committed offsets"
                )
            )

    def _within_time(self, guarded: _Guarded) -> bool:
        """Ask whether a broker answers, for the slow call `guarded`: if none does, its deadline
        moves to `timeout + grace` from now. False: the call is past its deadline (stalled)."""
        assert self._cluster_answers is not None
        answers = self._cluster_answers()
        now = time.monotonic()
        with self._condition:
            current = self._guarded
            if current is None or current.token != guarded.token:
                return True  # the call returned meanwhile
            deadline = current.deadline
            if not answers:
                if current.outage_seen is None:
                    log.warning(
                        "no broker answers; the blocked call waits for one",
                        call=current.what,
                        blocked_seconds=round(now - current.started, 1),
                    )
                deadline = max(deadline, now + current.timeout + self.grace)
            self._guarded = replace(
                current,
                deadline=deadline,
                next_check=now + self._outage_check,
                outage_seen=current.outage_seen if answers else now,
                checked=now,
            )
            return deadline > now
