"""The watchdog: silent while guarded calls finish in time, reports (once) a call that overruns,
and by default ends the process with a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from streamer.errors import StalledError
from streamer.kafka.watchdog import STALLED_EXIT_STATUS, Watchdog

WAIT = 10.0
"""Upper bound for waiting on the watchdog thread; only reached if the test fails."""


class Stalls:
    def __init__(self) -> None:
        self.errors: list[StalledError] = []
        self.event = threading.Event()

    def __call__(self, error: StalledError) -> None:
        self.errors.append(error)
        self.event.set()


def test_a_call_that_finishes_in_time_is_not_reported() -> None:
    stalls = Stalls()
    watchdog = Watchdog(grace=0.05, on_stall=stalls)
    try:
        for _ in range(20):
            with watchdog.guard("commit_transaction", 0.05):
                pass
        assert not stalls.event.wait(0.3)
    finally:
        watchdog.close()
    assert stalls.errors == []


def test_an_overrunning_call_is_reported_once_naming_it() -> None:
    stalls = Stalls()
    watchdog = Watchdog(grace=0.05, on_stall=stalls)
    try:
        with watchdog.guard("send_offsets_to_transaction", 0.05):
            assert stalls.event.wait(WAIT), "the overrun was not reported"
            time.sleep(0.3)  # still blocked: no second report for the same call
        assert len(stalls.errors) == 1
        message = str(stalls.errors[0])
        assert message.startswith("send_offsets_to_transaction has blocked for")
        assert "past its 0s timeout" in message
        assert "never committed" in message

        stalls.event.clear()
        with watchdog.guard("flush", 0.05):  # a later overrun is a new report
            assert stalls.event.wait(WAIT)
        assert [str(e).split()[0] for e in stalls.errors] == [
            "send_offsets_to_transaction",
            "flush",
        ]
    finally:
        watchdog.close()


def test_an_exception_ends_the_guard() -> None:
    stalls = Stalls()
    watchdog = Watchdog(grace=0.05, on_stall=stalls)
    try:
        with pytest.raises(KeyError), watchdog.guard("commit_transaction", 0.05):
            raise KeyError("boom")
        assert not stalls.event.wait(0.3)
        with watchdog.guard("abort_transaction", 1.0):  # the slot is free again
            pass
    finally:
        watchdog.close()


def test_guards_do_not_nest() -> None:
    watchdog = Watchdog(on_stall=Stalls())
    try:
        with (
            watchdog.guard("commit_transaction", 1.0),
            pytest.raises(RuntimeError, match="already"),
            watchdog.guard("flush", 1.0),
        ):
            pass
    finally:
        watchdog.close()


def test_a_negative_grace_is_refused() -> None:
    with pytest.raises(ValueError, match="grace"):
        Watchdog(grace=-1)


def test_by_default_the_process_ends_with_the_error_logged() -> None:
    """The main thread blocks in a call that never returns; the process still ends, status 1."""
    script = (
        "import time\n"
        "from streamer.logging import configure_logging\n"
        "from streamer.kafka.watchdog import Watchdog\n"
        "configure_logging('json')\n"
        "with Watchdog(grace=0.2).guard('send_offsets_to_transaction', 0.2):\n"
        "    time.sleep(60)\n"
    )
    # The call sleeps 60 s; ending within 30 s can only be the watchdog's doing.
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == STALLED_EXIT_STATUS, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    stopped = [line for line in lines if line["event"] == "stopped"]
    assert len(stopped) == 1, done.stderr
    assert stopped[0]["level"] == "error"
    assert stopped[0]["error_class"] == "StalledError"
    assert stopped[0]["error"].startswith("send_offsets_to_transaction has blocked for")


def test_guarding_names_the_call_under_way() -> None:
    """What `/livez` tells about a stuck loop: the guarded call and how long it has run."""
    watchdog = Watchdog(grace=5.0, on_stall=Stalls())
    try:
        assert watchdog.guarding is None
        with watchdog.guard("commit_transaction", 5.0):
            time.sleep(0.05)
            guarding = watchdog.guarding
            assert guarding is not None
            assert guarding[0] == "commit_transaction"
            assert guarding[1] >= 0.05
        assert watchdog.guarding is None
    finally:
        watchdog.close()


class Cluster:
    """Answers (or not) the watchdog's question whether a broker answers; counts the asking."""

    def __init__(self, answers: bool) -> None:
        self.answers = answers
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.answers


def test_a_call_waiting_out_an_outage_is_left_to_wait() -> None:
    """While no broker answers, a blocked call is waiting, not hung; once one answers again,
    its timeout and grace count from then."""
    stalls = Stalls()
    cluster = Cluster(answers=False)
    watchdog = Watchdog(grace=0.05, on_stall=stalls, cluster_answers=cluster, outage_check=0.02)
    try:
        with watchdog.guard("send_offsets_to_transaction", 0.05):
            assert not stalls.event.wait(0.5), "reported while no broker answered"
            assert cluster.asked >= 5
            assert watchdog.waiting_for_brokers  # what `/livez` takes for live
            cluster.answers = True
            back = time.monotonic()
            assert stalls.event.wait(WAIT), "not reported once the brokers answered"
            assert time.monotonic() - back >= 0.05
        assert len(stalls.errors) == 1
    finally:
        watchdog.close()


def test_a_call_returning_after_an_outage_is_not_reported() -> None:
    stalls = Stalls()
    cluster = Cluster(answers=False)
    watchdog = Watchdog(grace=0.05, on_stall=stalls, cluster_answers=cluster, outage_check=0.02)
    try:
        with watchdog.guard("commit_transaction", 0.05):
            time.sleep(0.3)
            cluster.answers = True
        assert not stalls.event.wait(0.3)
    finally:
        watchdog.close()
    assert stalls.errors == []


def test_quick_calls_never_ask_the_cluster() -> None:
    """A call normally takes milliseconds: only one running `outage_check` seconds asks."""
    cluster = Cluster(answers=True)
    watchdog = Watchdog(grace=5.0, on_stall=Stalls(), cluster_answers=cluster, outage_check=0.5)
    try:
        for _ in range(20):
            with watchdog.guard("commit_transaction", 5.0):
                pass
        time.sleep(0.6)
    finally:
        watchdog.close()
    assert cluster.asked == 0
