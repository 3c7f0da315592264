"""Progress: a bar on a terminal, periodic log lines anywhere else."""

from __future__ import annotations

import io

from structlog.testing import capture_logs

from streamer.progress import Progress


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
