"""Progress and heartbeats: a bar or seconds on a terminal, periodic log lines anywhere else."""

from __future__ import annotations

import io
import threading

from structlog.testing import capture_logs

from streamer.progress import Heartbeat, Progress


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestProgress:
    def test_draws_a_bar_on_a_terminal(self) -> None:
        """On a TTY the bar shows progress and total, and logs nothing."""
        stream = TtyBuffer()
        with capture_logs() as logs:
            bar = Progress("produce", 200, stream=stream)
            bar.update(100, force=True)
            bar.close()
        assert "100/200" in stream.getvalue()
        assert "#" * 15 in stream.getvalue()
        assert stream.getvalue().endswith("\n")
        assert logs == []

    def test_logs_lines_when_not_a_terminal(self) -> None:
        """Piped: nothing drawn; a progress line per interval and a closing line with the total."""
        stream = io.StringIO()
        with capture_logs() as logs:
            progress = Progress("audit", 10, stream=stream, interval=3600)
            progress.update(4)  # within the interval: no line yet
            progress.update(5, force=True)
            progress.update(10)
            progress.close()
        assert stream.getvalue() == ""
        assert [entry["event"] for entry in logs] == ["audit progress", "audit done"]
        assert logs[0]["done"] == 5
        assert logs[0]["percent"] == 50.0
        assert logs[1]["done"] == 10

    def test_a_line_per_interval(self) -> None:
        """With a zero interval every update is a line."""
        with capture_logs() as logs:
            progress = Progress("dlq replay", 3, stream=io.StringIO(), interval=0.0)
            for done in (1, 2, 3):
                progress.update(done)
        assert [entry["done"] for entry in logs] == [1, 2, 3]


class SteppedClock:
    """A clock that reads `times` in turn, and signals each read after the first."""

    def __init__(self, *times: float) -> None:
        self._times = list(times)
        self.read_again = threading.Event()
        self._reads = 0

    def __call__(self) -> float:
        self._reads += 1
        if self._reads > 1:
            self.read_again.set()
        return self._times[min(self._reads, len(self._times)) - 1]


class TestHeartbeat:
    def test_logs_the_seconds_so_far_when_not_a_terminal(self) -> None:
        """Piped: a line with the event, the whole seconds since the block began and the fields."""
        stream = io.StringIO()
        heartbeat = Heartbeat(
            "still_fitting",
            stream=stream,
            interval=3600,
            clock=SteppedClock(100.0, 112.4),
            model="with history",
        )
        with capture_logs() as logs, heartbeat:
            heartbeat.beat()
        assert stream.getvalue() == ""
        assert logs == [
            {"event": "still_fitting", "seconds": 12, "model": "with history", "log_level": "info"}
        ]

    def test_redraws_in_place_on_a_terminal(self) -> None:
        """On a TTY the seconds are redrawn on one line, ended when the block ends; no log."""
        stream = TtyBuffer()
        heartbeat = Heartbeat(
            "still_fitting",
            stream=stream,
            clock=SteppedClock(0.0, 1.0, 2.0),
            model="with history",
            fit="early stopping",
        )
        with capture_logs() as logs, heartbeat:
            heartbeat.beat()
            heartbeat.beat()
        assert stream.getvalue() == (
            "\rstill_fitting (with history, early stopping): 1 s "
            "\rstill_fitting (with history, early stopping): 2 s \n"
        )
        assert logs == []

    def test_a_block_shorter_than_the_interval_shows_nothing(self) -> None:
        stream = io.StringIO()
        with capture_logs() as logs, Heartbeat("still_fitting", stream=stream, interval=3600):
            pass
        assert logs == []
        assert stream.getvalue() == ""

    def test_beats_from_a_thread_while_the_block_runs(self) -> None:
        """The block waits for a beat it never calls itself; the thread is gone afterwards."""
        clock = SteppedClock(0.0, 30.0)
        heartbeat = Heartbeat("still_fitting", stream=io.StringIO(), interval=0.001, clock=clock)
        with capture_logs() as logs, heartbeat:
            assert clock.read_again.wait(timeout=60)
        assert logs
        assert {(entry["event"], entry["seconds"]) for entry in logs} == {("still_fitting", 30)}
        assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat")]
