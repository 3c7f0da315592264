"""The command line: exit codes and messages a user sees before anything touches Kafka."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest

from streamer.cli import (
    EXIT_MODEL_REFUSED,
    EXIT_USAGE,
    YOUNG_COLLECTION_THRESHOLD,
    build_parser,
    main,
    tune_garbage_collector,
)


@pytest.fixture(autouse=True)
def _unreachable_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing here may reach a broker: point at a port nobody listens on.
    monkeypatch.setenv("STREAMER_BOOTSTRAP_SERVERS", "127.0.0.1:1")


class TestExitCodes:
    def test_invalid_variable_exits_2_naming_it(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A bad STREAMER_ variable: exit 2 and a one-line message naming it."""
        monkeypatch.setenv("STREAMER_LOG_LEVEL", "loud")
        assert main(["run"]) == EXIT_USAGE
        error = capsys.readouterr().err
        assert "STREAMER_LOG_LEVEL" in error
        assert "'loud'" in error

    def test_bad_kafka_setting_exits_2_before_the_broker_and_the_model(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """librdkafka's refusal names the variable; no model (3) and no broker (1) come first."""
        monkeypatch.setenv("STREAMER_KAFKA_LINGER_MS", "soon")
        code = main(["run", "--model-path", str(tmp_path / "none.skops"), "--log-format", "json"])
        assert code == EXIT_USAGE
        error = capsys.readouterr().err
        assert "STREAMER_KAFKA_LINGER_MS" in error
        assert "streamer train" not in error

    def test_unknown_variable_is_warned_about_with_the_closest_name(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A typo in a variable name is a warning naming it and the name meant; not an error."""
        monkeypatch.setenv("STREAMER_THRESHOLDD", "0.5")
        monkeypatch.setenv("STREAMER_KAFKA_LINGER_MS", "soon")  # stops before any broker
        assert main(["tail", "--log-format", "json"]) == EXIT_USAGE
        warning = next(
            json.loads(line)
            for line in capsys.readouterr().err.splitlines()
            if "unknown variable" in line
        )
        assert warning["variable"] == "STREAMER_THRESHOLDD"
        assert warning["did_you_mean"] == "STREAMER_THRESHOLD"
        assert warning["level"] == "warning"

    @pytest.fixture
    def _broker_answers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # The broker and topic checks come first; the model's turn is what these tests look at.
        monkeypatch.setattr("streamer.cli._connect", lambda *_args, **_kwargs: None)

    @pytest.mark.usefixtures("_broker_answers")
    def test_missing_model_exits_3(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """No artefact at the model path: exit 3 with a message saying how to make one."""
        code = main(["run", "--model-path", str(tmp_path / "none.skops"), "--log-format", "json"])
        assert code == EXIT_MODEL_REFUSED
        assert "streamer train" in capsys.readouterr().err

    @pytest.mark.usefixtures("_broker_answers")
    def test_exactly_once_checks_the_model_before_kafka(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """exactly-once too verifies the model before it creates a transactional producer."""
        argv = [
            "run",
            "--processing-guarantee",
            "exactly-once",
            "--bootstrap-servers",
            "127.0.0.1:1",
        ]
        code = main([*argv, "--model-path", str(tmp_path / "none.skops"), "--log-format", "json"])
        assert code == EXIT_MODEL_REFUSED
        assert "streamer train" in capsys.readouterr().err

    @pytest.mark.parametrize(
        "argv",
        [["produce", "--count", "0"], ["produce", "--rate", "-5"], ["tail", "--format", "xml"]],
    )
    def test_bad_flags_are_usage_errors(self, argv: list[str]) -> None:
        """Flag values out of range are refused by the parser (exit 2)."""
        with pytest.raises(SystemExit) as caught:
            build_parser().parse_args(argv)
        assert caught.value.code == EXIT_USAGE


class TestTuneGarbageCollector:
    def test_start_up_objects_leave_the_collector_and_young_collections_are_rarer(self) -> None:
        """What exists before the loop is frozen; the youngest generation waits longer."""
        kept = [object() for _ in range(10)]
        threshold = gc.get_threshold()
        try:
            tune_garbage_collector()
            assert gc.get_freeze_count() >= len(kept)
            assert gc.get_threshold()[0] == YOUNG_COLLECTION_THRESHOLD > threshold[0]
        finally:
            gc.unfreeze()
            gc.set_threshold(*threshold)
