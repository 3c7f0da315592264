"""The Kafka layer's start-up checks and connection-trouble logging, without a broker."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from structlog.testing import capture_logs

from streamer.errors import ConfigError
from streamer.kafka.clients import (
    RECOVERY_GRACE_SECONDS,
    ClientErrors,
    ReachabilityProbe,
    check_client_config,
    log_commit_result,
    topic_partitions,
)
from streamer.settings import load_settings


class TestClientConfig:
    def test_the_defaults_are_accepted(self) -> None:
        """No pass-through: nothing to refuse, in either guarantee."""
        check_client_config(load_settings())
        check_client_config(load_settings(processing_guarantee="exactly-once"))

    @pytest.mark.parametrize(
        ("variable", "value", "expected"),
        [
            ("STREAMER_KAFKA_LINGERR_MS", "5", "No such configuration property"),
            # An alias: librdkafka names queue.buffering.max.ms; the variable is still named.
            ("STREAMER_KAFKA_LINGER_MS", "soon", "Invalid value"),
            ("STREAMER_KAFKA_SESSION_TIMEOUT_MS", "-4", "session.timeout.ms"),
            ("STREAMER_KAFKA_COMPRESSION_TYPE", "zip", "compression"),
        ],
    )
    def test_a_refused_setting_names_its_variable(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
    ) -> None:
        """librdkafka's refusal comes back as a ConfigError naming the STREAMER_KAFKA_ variable."""
        monkeypatch.setenv("STREAMER_KAFKA_CLIENT_ID", "fine")
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError) as caught:
            check_client_config(load_settings())
        message = str(caught.value)
        assert message.startswith(f"{variable}: ")
        assert expected in message
        assert "STREAMER_KAFKA_CLIENT_ID" not in message

    def test_a_setting_refused_only_with_another_is_named(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
    ) -> None:
        """An unreadable CA file matters only with SSL on; the file's variable is named."""
        monkeypatch.setenv("STREAMER_KAFKA_SECURITY_PROTOCOL", "SSL")
        monkeypatch.setenv("STREAMER_KAFKA_SSL_CA_LOCATION", str(tmp_path / "none.pem"))
        with pytest.raises(ConfigError, match=r"^STREAMER_KAFKA_SSL_CA_LOCATION: "):
            check_client_config(load_settings())

    def test_a_secret_value_is_not_shown(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A refused secret is named by its variable, its value masked."""
        monkeypatch.setenv("STREAMER_KAFKA_SASL_PASSWORDD", "hunter2")
        with pytest.raises(ConfigError) as caught:
            check_client_config(load_settings())
        assert "STREAMER_KAFKA_SASL_PASSWORDD" in str(caught.value)
        assert "hunter2" not in str(caught.value)


def _transport(text: str = "127.0.0.1:1/bootstrap: Connect failed") -> KafkaError:
    return KafkaError(KafkaError._TRANSPORT, text)


def _all_down() -> KafkaError:
    return KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down")


class TestConnectionTrouble:
    def test_retries_are_logged_once_per_change_of_state(self) -> None:
        """Trouble, all down, then a hundred retries: two lines; recovery: one more."""
        errors = ClientErrors("consumer")
        with capture_logs() as logs:
            errors(_transport())
            errors(_all_down())
            for _ in range(100):
                errors(_transport())
                errors(_all_down())
            errors.reachable()
        assert [entry["event"] for entry in logs] == [
            "kafka connection trouble",
            "kafka brokers all down, retrying",
            "kafka brokers reachable again",
        ]
        assert logs[-1]["repeated_errors"] == 200

    def test_a_new_outage_is_logged_again(self) -> None:
        """After recovery, the next outage gets its own line."""
        errors = ClientErrors("producer")
        with capture_logs() as logs:
            errors(_all_down())
            errors.reachable()
            errors(_all_down())
        assert [entry["event"] for entry in logs] == [
            "kafka brokers all down, retrying",
            "kafka brokers reachable again",
            "kafka brokers all down, retrying",
        ]

    def test_reachable_without_trouble_says_nothing(self) -> None:
        """A client that never lost its brokers logs no recovery."""
        with capture_logs() as logs:
            ClientErrors("consumer").reachable()
        assert logs == []

    def test_a_late_report_of_the_outage_starts_no_new_trouble(self) -> None:
        """A failed connection served just after the recovery (queued while the client's thread
        was blocked) is the outage that ended, not a new one; one that lasts is logged."""
        now = [100.0]
        errors = ClientErrors("producer", clock=lambda: now[0])
        with capture_logs() as logs:
            errors(_transport())
            errors(_all_down())
            errors.reachable()
            now[0] += 0.1
            errors(_transport("127.0.0.1:1/bootstrap: Connect failed (95 identical suppressed)"))
            now[0] += RECOVERY_GRACE_SECONDS
            errors(_transport())
        assert [entry["event"] for entry in logs if entry["log_level"] != "debug"] == [
            "kafka connection trouble",
            "kafka brokers all down, retrying",
            "kafka brokers reachable again",
            "kafka connection trouble",
        ]
        assert errors.trouble_since == now[0]

    def test_all_down_is_logged_even_just_after_a_recovery(self) -> None:
        """librdkafka says it once per outage: it is never taken for a late report."""
        errors = ClientErrors("consumer", clock=lambda: 50.0)
        with capture_logs() as logs:
            errors.reachable()  # a probe answered for another client: this one had no trouble
            errors(_all_down())
        assert [entry["event"] for entry in logs] == ["kafka brokers all down, retrying"]
        assert errors.all_down

    def test_other_errors_are_each_logged(self) -> None:
        """Errors other than connection trouble are not folded."""
        errors = ClientErrors("consumer")
        with capture_logs() as logs:
            for _ in range(3):
                errors(KafkaError(KafkaError._MSG_TIMED_OUT, "timed out"))
        assert [entry["event"] for entry in logs] == ["kafka error"] * 3


class _Cluster:
    def __init__(self) -> None:
        self.answers = False
        self.asked = 0

    def list_topics(self, timeout: float) -> object:
        self.asked += 1
        if not self.answers:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "no broker"))
        return object()


class TestReachabilityProbe:
    def test_asks_only_while_all_brokers_are_down_and_ends_the_outage(self) -> None:
        """No question while healthy; every interval while down; an answer ends the outage."""
        cluster = _Cluster()
        consumer, producer = ClientErrors("consumer"), ClientErrors("producer")
        probe = ReachabilityProbe(cluster, [consumer, producer], interval=5.0)  # type: ignore[arg-type]
        probe.check(100.0)
        assert cluster.asked == 0
        with capture_logs() as logs:
            consumer(_all_down())
            probe.check(100.0)
            probe.check(101.0)
            assert cluster.asked == 1
            cluster.answers = True
            probe.check(105.0)
        assert cluster.asked == 2
        assert consumer.trouble_since is None
        assert [entry["event"] for entry in logs][-1] == "kafka brokers reachable again"


class _Partition:
    def __init__(self, leader: int) -> None:
        self.leader = leader


class _Topic:
    def __init__(self, leaders: list[int], error: KafkaError | None = None) -> None:
        self.partitions = {index: _Partition(leader) for index, leader in enumerate(leaders)}
        self.error = error


class _Metadata:
    def __init__(self, topics: dict[str, _Topic]) -> None:
        self.topics = topics


class _NewTopicConsumer:
    """Answers as a broker does for a topic created moments ago: unknown, leaderless, ready."""

    def __init__(self, answers: list[dict[str, _Topic]]) -> None:
        self._answers = answers
        self.asked = 0

    def list_topics(self, topic: str, timeout: float) -> _Metadata:
        answer = self._answers[min(self.asked, len(self._answers) - 1)]
        self.asked += 1
        return _Metadata(answer)


class TestTopicPartitions:
    def test_waits_out_a_brand_new_topic(self) -> None:
        """Unknown, then without a leader, then ready: the partitions, after three questions."""
        unknown = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
        consumer = _NewTopicConsumer(
            [{"t": _Topic([], unknown)}, {"t": _Topic([1, -1])}, {"t": _Topic([1, 1])}]
        )
        assert topic_partitions(consumer, "t", timeout=10) == [0, 1]  # type: ignore[arg-type]
        assert consumer.asked == 3

    def test_gives_up_after_the_timeout_naming_the_topic(self) -> None:
        """A topic that never appears: an error naming it once the time is up."""
        consumer = _NewTopicConsumer([{}])
        with pytest.raises(KafkaException, match=r"t: not ready after 0\.3 s"):
            topic_partitions(consumer, "t", timeout=0.3)  # type: ignore[arg-type]


class TestBackgroundCommits:
    def test_a_failed_commit_is_logged_with_its_partitions(self) -> None:
        """A commit made in the background that fails is said once, naming what it was for."""
        with capture_logs() as logs:
            log_commit_result(
                KafkaError(KafkaError.REBALANCE_IN_PROGRESS), [TopicPartition("t", 1, 42)]
            )
            log_commit_result(None, [TopicPartition("t", 1, 43)])
            log_commit_result(KafkaError(KafkaError._NO_OFFSET), [])
        assert [entry["partitions"] for entry in logs] == [["t[1]@42"]]
        assert logs[0]["log_level"] == "warning"
