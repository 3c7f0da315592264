"""Misconfiguration fails fast, says why, once: the commands as a user runs them.

An unreachable broker is a closed local port (127.0.0.1:1) with a 2 s connect timeout; missing
topics are uuid names on the real broker that nobody created.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from tests.conftest import ROOT, Topics
from tests.integration.support import scorer_env, streamer_command

UNREACHABLE = "127.0.0.1:1"
CONNECT_TIMEOUT = 2.0
STARTUP_ALLOWANCE = 20.0
"""Python start-up and imports on a busy two-core machine, on top of the connect timeout."""


def streamer(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        streamer_command(*args),
        env=env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_events(stderr: str) -> list[dict[str, object]]:
    """Every JSON log line of `stderr`; fails on any other line (raw librdkafka output)."""
    events = []
    for line in stderr.splitlines():
        assert line.startswith("{"), f"not a structured log line: {line[:200]}"
        events.append(json.loads(line))
    return events


def unused_topics() -> Topics:
    suffix = uuid.uuid4().hex[:12]
    return Topics(f"in-{suffix}", f"out-{suffix}", f"dlq-{suffix}", f"group-{suffix}")


def existing(bootstrap: str, names: list[str]) -> set[str]:
    topics = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=30).topics
    return {name for name in names if name in topics}


class TestUnreachableBroker:
    @pytest.mark.parametrize(
        "args",
        [
            ("produce", "--count", "1000"),
            ("run",),
            ("tail",),
            ("topics", "create"),
        ],
        ids=lambda args: " ".join(args),
    )
    def test_exits_1_within_the_connect_timeout_naming_the_servers(
        self, tmp_path: Path, args: tuple[str, ...]
    ) -> None:
        """No broker answers: exit 1 after about the connect timeout, one line naming it."""
        env = scorer_env(
            UNREACHABLE,
            unused_topics(),
            tmp_path / "no-model.skops",
            STREAMER_CONNECT_TIMEOUT=str(CONNECT_TIMEOUT),
        )
        started = time.monotonic()
        result = streamer(env, *args)
        elapsed = time.monotonic() - started
        assert result.returncode == 1, result.stderr[-2000:]
        assert CONNECT_TIMEOUT <= elapsed < CONNECT_TIMEOUT + STARTUP_ALLOWANCE
        events = log_events(result.stderr)
        assert len(events) == 1, result.stderr
        assert events[0]["error_class"] == "BrokerUnreachableError"
        assert f"no Kafka broker answered at {UNREACHABLE} within 2 s" in str(events[0]["error"])
        assert "Connection refused" in str(events[0]["error"])


class TestMissingTopics:
    def test_run_exits_2_naming_the_missing_topic_before_loading_the_model(
        self, bootstrap_servers: str, topics: Topics, tmp_path: Path
    ) -> None:
        """The verdict topic does not exist: exit 2 naming it and its variable; no model needed."""
        missing = f"nowhere-{uuid.uuid4().hex[:12]}"
        env = scorer_env(
            bootstrap_servers,
            topics,
            tmp_path / "no-model.skops",
            STREAMER_OUTPUT_TOPIC=missing,
        )
        result = streamer(env, "run", "--until-idle", "1")
        assert result.returncode == 2, result.stderr[-2000:]
        (event,) = log_events(result.stderr)
        assert event["event"] == "missing topic"
        assert f"topic '{missing}'" in str(event["error"])
        assert "STREAMER_OUTPUT_TOPIC" in str(event["error"])
        assert "--allow-auto-create" in str(event["error"])
        assert existing(bootstrap_servers, [missing]) == set()

    def test_run_with_a_challenger_exits_2_naming_a_missing_shadow_topic(
        self, bootstrap_servers: str, topics: Topics, tmp_path: Path
    ) -> None:
        """A challenger's verdict topic is checked like the others: without it an exactly-once
        scorer would abort every transaction, an at-least-once one lose the shadow verdicts."""
        missing = f"nowhere-{uuid.uuid4().hex[:12]}"
        env = scorer_env(
            bootstrap_servers,
            topics,
            tmp_path / "no-model.skops",
            STREAMER_SHADOW_MODEL_PATH=str(tmp_path / "no-challenger.skops"),
            STREAMER_SHADOW_TOPIC=missing,
        )
        result = streamer(env, "run", "--until-idle", "1")
        assert result.returncode == 2, result.stderr[-2000:]
        (event,) = log_events(result.stderr)
        assert event["event"] == "missing topic"
        assert f"topic '{missing}'" in str(event["error"])
        assert "STREAMER_SHADOW_TOPIC" in str(event["error"])
        assert existing(bootstrap_servers, [missing]) == set()

    @pytest.mark.parametrize(
        ("command", "variable"),
        [
            (("tail", "--count", "1"), "STREAMER_OUTPUT_TOPIC"),
            (("produce",), "STREAMER_INPUT_TOPIC"),
        ],
        ids=["tail", "produce"],
    )
    def test_tools_say_so(
        self, bootstrap_servers: str, tmp_path: Path, command: tuple[str, ...], variable: str
    ) -> None:
        """tail and produce on a topic nobody created: exit 2 naming it; nothing is created."""
        names = unused_topics()
        env = scorer_env(bootstrap_servers, names, tmp_path / "unused")
        result = streamer(env, *command)
        assert result.returncode == 2, result.stderr[-2000:]
        (event,) = log_events(result.stderr)
        assert variable in str(event["error"])
        assert existing(bootstrap_servers, [names.input, names.output]) == set()

    def test_allow_auto_create_lets_the_broker_create_them(
        self, bootstrap_servers: str, model_path: Path
    ) -> None:
        """With --allow-auto-create the scorer has the broker create all three and runs."""
        names = unused_topics()
        env = scorer_env(bootstrap_servers, names, model_path)
        result = streamer(env, "run", "--allow-auto-create", "--until-idle", "1")
        assert result.returncode == 0, result.stderr[-3000:]
        created = [
            e for e in log_events(result.stderr) if e["event"] == "topics created by the broker"
        ]
        assert created
        assert created[0]["topics"] == [names.input, names.output, names.dlq]
        assert existing(bootstrap_servers, [names.input, names.output, names.dlq]) == {
            names.input,
            names.output,
            names.dlq,
        }


class TestBadConfiguration:
    def test_bad_kafka_value_exits_2_naming_the_variable(
        self, bootstrap_servers: str, topics: Topics, tmp_path: Path
    ) -> None:
        """A value librdkafka refuses: exit 2 at once, naming STREAMER_KAFKA_*; typos warned."""
        env = scorer_env(
            bootstrap_servers,
            topics,
            tmp_path / "no-model.skops",
            STREAMER_KAFKA_LINGER_MS="soon",
            STREAMER_GROUPID="typo",
        )
        result = streamer(env, "run")
        assert result.returncode == 2, result.stderr[-2000:]
        warning, error = log_events(result.stderr)
        assert warning["variable"] == "STREAMER_GROUPID"
        assert warning["did_you_mean"] == "STREAMER_GROUP_ID"
        assert str(error["error"]).startswith("STREAMER_KAFKA_LINGER_MS: ")


class TestProduceInterrupted:
    def test_ctrl_c_exits_130_saying_how_many_were_delivered(
        self, bootstrap_servers: str, topics: Topics
    ) -> None:
        """SIGINT mid-run: progress lines before, then exit 130 with the delivered count."""
        env = scorer_env(bootstrap_servers, topics, Path("unused"))
        process = subprocess.Popen(
            streamer_command("produce", "--count", "100000", "--rate", "500"),
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stderr is not None
        lines = []
        try:
            # Wait for a progress line (STREAMER_PROGRESS_INTERVAL=1 in scorer_env): sending.
            for line in process.stderr:
                lines.append(line)
                if '"produce progress"' in line:
                    break
            process.send_signal(signal.SIGINT)
            _, rest = process.communicate(timeout=60)
        finally:
            process.kill()
        events = log_events("".join(lines) + rest)
        assert process.returncode == 130, rest[-2000:]
        progress = [e for e in events if e["event"] == "produce progress"]
        assert progress
        assert progress[0]["total"] == 100_000
        (interrupted,) = [e for e in events if e["event"] == "produce interrupted"]
        delivered, sent = interrupted["delivered"], interrupted["sent"]
        assert isinstance(delivered, int)
        assert isinstance(sent, int)
        assert 0 < delivered <= sent < 100_000
        assert interrupted["unacknowledged"] == 0
