"""Fault-suite helpers: a paced feed, scorer processes to kill, and `streamer audit` verdicts.

Every case reconciles with `streamer audit --json`, the same command users run, and records its
counts with `record` so the suite can print one table per run (see conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from streamer.kafka.clients import OutputProducer
from streamer.synthetic import SyntheticWorld
from streamer.tools.produce import ProduceReport, publish
from tests.conftest import ROOT, Topics
from tests.integration.support import committed_offsets, end_offsets, scorer_env, streamer_command

FULL: Final = os.environ.get("STREAMER_FAULT_SCALE", "short") == "full"
"""`scripts/fault` runs the long form (STREAMER_FAULT_SCALE=full); the test suite the short one."""

MODES: Final = ("at-least-once", "exactly-once")
RESULTS: list[dict[str, Any]] = []
"""What each case measured, printed as a table at the end of the session."""


def scaled(short: int, full: int) -> int:
    return full if FULL else short


def record(case: str, mode: str, **values: Any) -> None:
    RESULTS.append({"case": case, "mode": mode, **values})


class Feed(threading.Thread):
    """Produces `count` synthetic events at `rate` events/s in the background."""

    def __init__(self, bootstrap: str, topic: str, count: int, rate: float, seed: int) -> None:
        super().__init__(daemon=True)
        self._producer = OutputProducer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self._topic = topic
        self._events = SyntheticWorld(seed).generate(count)
        self._rate = rate
        self.count = count
        self.report: ProduceReport | None = None

    def run(self) -> None:
        self.report = publish(self._producer, self._topic, self._events, rate=self._rate)

    def finish(self, timeout: float = 300.0) -> ProduceReport:
        self.join(timeout)
        assert not self.is_alive(), "the feed did not finish"
        assert self.report is not None
        assert self.report.acknowledged == self.count, self.report
        return self.report


@dataclass
class Scorer:
    """One `streamer run` process; its log goes to a file (a full pipe would block it)."""

    env: dict[str, str]
    log_path: Path
    args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Scorer:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                streamer_command("run", *self.args),
                env=self.env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.signal(signal.SIGKILL)
        self.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 120.0) -> None:
        """Wait until the log shows `text` (e.g. that the scorer has joined its group)."""
        wait_until(lambda: text in self.log() or not self.alive(), timeout, f"log line {text!r}")
        assert self.alive(), self.log()[-3000:]


def fault_env(
    bootstrap: str, topics: Topics, model_path: Path, mode: str, **extra: str
) -> dict[str, str]:
    return scorer_env(
        bootstrap,
        topics,
        model_path,
        STREAMER_PROCESSING_GUARANTEE=mode,
        STREAMER_PROGRESS_INTERVAL="2",
        **extra,
    )


def audit(env: dict[str, str], mode: str) -> dict[str, Any]:
    """`streamer audit --json --expect <mode>`; the report with its exit status."""
    result = subprocess.run(
        streamer_command("audit", "--json", "--expect", mode),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report: dict[str, Any] = json.loads(result.stdout)
    report["returncode"] = result.returncode
    return report


def caught_up(bootstrap: str, topics: Topics) -> bool:
    """The group's committed offsets have reached the input topic's end offsets."""
    ends = end_offsets(bootstrap, topics.input)
    committed = committed_offsets(bootstrap, topics)
    return all(committed.get(p, -1) >= end for p, end in ends.items())


def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.25) -> float:
    """Poll `condition()` until true; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, f"timed out after {timeout:.0f}s: {what}"
        time.sleep(interval)
    return time.monotonic() - started


def committed_total(bootstrap: str, topics: Topics) -> int:
    return sum(max(offset, 0) for offset in committed_offsets(bootstrap, topics).values())
