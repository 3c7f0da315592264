"""Configuration: contract defaults, errors that name the variable, secrets never shown."""

from __future__ import annotations

import os

import pytest

from streamer.errors import ConfigError
from streamer.settings import known_variables, load_settings, unknown_variables


class TestDefaults:
    def test_contract_defaults(self) -> None:
        """With no variables set, the contract's defaults apply."""
        settings = load_settings()
        assert settings.bootstrap_servers == "localhost:9092"
        assert settings.input_topic == "transactions"
        assert settings.output_topic == "fraud-verdicts"
        assert settings.dlq_topic == "transactions-dlq"
        assert settings.group_id == "streamer"
        assert str(settings.model_path) == "models/fraud-model.skops"
        assert settings.threshold is None
        assert settings.processing_guarantee == "at-least-once"

    def test_flags_override_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A flag given on the command line wins over the variable."""
        monkeypatch.setenv("STREAMER_INPUT_TOPIC", "from-env")
        assert load_settings(input_topic="from-flag").input_topic == "from-flag"
        assert load_settings(input_topic=None).input_topic == "from-env"


class TestErrors:
    @pytest.mark.parametrize(
        ("variable", "value", "expected"),
        [
            ("STREAMER_THRESHOLD", "high", "valid number"),
            ("STREAMER_THRESHOLD", "1.5", "less than or equal to 1"),
            ("STREAMER_PROCESSING_GUARANTEE", "at-most-once", "'at-least-once' or 'exactly-once'"),
            ("STREAMER_INPUT_TOPIC", "bad topic!", "topic name"),
            ("STREAMER_LOG_FORMAT", "xml", "'console' or 'json'"),
            ("STREAMER_BATCH_SIZE", "0", "greater than or equal to 1"),
        ],
    )
    def test_bad_value_names_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
    ) -> None:
        """The error names the variable, the problem and the value received."""
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigError) as caught:
            load_settings()
        message = str(caught.value)
        assert variable in message
        assert expected in message
        assert repr(value) in message

    def test_bad_flag_names_the_flag(self) -> None:
        """A bad flag value is reported as the flag, not as a variable."""
        with pytest.raises(ConfigError, match="--threshold"):
            load_settings(threshold=7.0)

    def test_protected_kafka_property_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A pass-through may not weaken the delivery guarantee."""
        monkeypatch.setenv("STREAMER_KAFKA_ENABLE_AUTO_OFFSET_STORE", "true")
        with pytest.raises(ConfigError, match="STREAMER_KAFKA_ENABLE_AUTO_OFFSET_STORE"):
            load_settings()


class TestKafkaPassThrough:
    def test_variables_become_librdkafka_properties(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """STREAMER_KAFKA_SECURITY_PROTOCOL reaches every client as security.protocol."""
        monkeypatch.setenv("STREAMER_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
        settings = load_settings()
        for config in (
            settings.consumer_config(),
            settings.producer_config(),
            settings.admin_config(),
        ):
            assert config["security.protocol"] == "SASL_SSL"

    def test_secrets_are_masked_in_the_loggable_view(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A SASL password never appears in what is logged, yet reaches the client."""
        monkeypatch.setenv("STREAMER_KAFKA_SASL_PASSWORD", "canary-7f3a")
        settings = load_settings()
        assert "canary-7f3a" not in repr(settings.loggable())
        assert "canary-7f3a" not in repr(settings)
        assert settings.producer_config()["sasl.password"] == "canary-7f3a"

    def test_guarantee_settings(self) -> None:
        """The scorer's clients carry the at-least-once settings."""
        settings = load_settings()
        assert settings.consumer_config()["enable.auto.offset.store"] is False
        producer = settings.producer_config()
        assert producer["enable.idempotence"] is True
        assert producer["acks"] == "all"
        assert producer["max.in.flight.requests.per.connection"] == 1

    @pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
    def test_one_produce_request_in_flight(
        self, guarantee: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Both modes keep one request in flight: a later batch cannot overtake a refused one."""
        monkeypatch.setenv("STREAMER_PROCESSING_GUARANTEE", guarantee)
        monkeypatch.setenv("STREAMER_INSTANCE_ID", "pod-0")
        settings = load_settings()
        config = settings.producer_config(transactional=settings.exactly_once)

        assert config["max.in.flight.requests.per.connection"] == 1

    @pytest.mark.parametrize(
        "variable",
        [
            "STREAMER_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION",
            "STREAMER_KAFKA_MAX_IN_FLIGHT",
        ],
    )
    def test_in_flight_requests_cannot_be_raised(
        self, variable: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The setting and its librdkafka alias are refused at start-up, naming the variable."""
        monkeypatch.setenv(variable, "5")
        with pytest.raises(ConfigError, match=variable):
            load_settings()

    def test_client_buffers_are_bounded(self) -> None:
        """The consumer prefetch and the producer queue stay small; a full prefetch queue pauses
        fetching briefly, so the small queue does not starve the loop."""
        settings = load_settings()
        consumer = settings.consumer_config()
        assert consumer["queued.max.messages.kbytes"] <= 4096
        assert consumer["fetch.queue.backoff.ms"] <= 50
        assert settings.producer_config()["queue.buffering.max.messages"] <= 100_000

    def test_state_readers_do_not_wait_out_full_queue_pauses(self) -> None:
        """A restore and the serve replica read faster than they apply: a full fetch queue must
        pause fetching briefly, not for librdkafka's default second, and stay small."""
        settings = load_settings()
        for config in (settings.changelog_reader_config(), settings.replica_reader_config()):
            assert config["fetch.queue.backoff.ms"] <= 50
            assert config["queued.max.messages.kbytes"] <= 16384

    def test_exactly_once_settings(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """exactly-once: a transactional producer, no consumer commits, committed input only."""
        monkeypatch.setenv("STREAMER_PROCESSING_GUARANTEE", "exactly-once")
        monkeypatch.setenv("STREAMER_GROUP_ID", "scorers")
        monkeypatch.setenv("STREAMER_INSTANCE_ID", "pod-0")
        monkeypatch.setenv("STREAMER_KAFKA_TRANSACTION_TIMEOUT_MS", "20000")
        settings = load_settings()
        consumer = settings.consumer_config()
        assert consumer["enable.auto.commit"] is False
        assert consumer["isolation.level"] == "read_committed"
        producer = settings.producer_config(transactional=True)
        assert producer["transactional.id"] == "scorers-pod-0"
        assert int(producer["transaction.timeout.ms"]) == 20000
        assert producer["delivery.timeout.ms"] == 20000
        assert producer["delivery.report.only.error"] is True
        # Re-bootstrapping after every broker was down strands send_offsets_to_transaction.
        assert producer["metadata.recovery.strategy"] == "none"
        assert "transactional.id" not in settings.producer_config()
        # at-least-once moves its commit position on each success report.
        assert "delivery.report.only.error" not in settings.producer_config()

    def test_success_reports_cannot_be_switched_off(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """at-least-once commits nothing without them, so the pass-through is refused."""
        monkeypatch.setenv("STREAMER_KAFKA_DELIVERY_REPORT_ONLY_ERROR", "true")
        with pytest.raises(ConfigError, match="STREAMER_KAFKA_DELIVERY_REPORT_ONLY_ERROR"):
            load_settings()

    def test_default_instance_id_is_unique_per_process(self) -> None:
        """Without STREAMER_INSTANCE_ID the transactional id names the host and the process."""
        transactional_id = load_settings().transactional_id()
        assert transactional_id.startswith("streamer-")
        assert transactional_id.endswith(f"-{os.getpid()}")

    def test_instance_id_is_checked(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STREAMER_INSTANCE_ID", "has space")
        with pytest.raises(ConfigError, match="STREAMER_INSTANCE_ID"):
            load_settings()


class TestUnknownVariables:
    def test_a_typo_is_named_with_the_closest_known_variable(self) -> None:
        """STREAMER_BOOTSTRAP_SERVER (no S) is unknown; the suggestion is the real name."""
        environ = {"STREAMER_BOOTSTRAP_SERVER": "broker:9092", "STREAMER_INPUT_TOPIC": "t"}
        assert unknown_variables(environ) == [
            ("STREAMER_BOOTSTRAP_SERVER", "STREAMER_BOOTSTRAP_SERVERS")
        ]

    def test_nothing_close_gives_no_suggestion(self) -> None:
        """An unrelated name is reported without a guess."""
        assert unknown_variables({"STREAMER_WHATEVER_THIS_IS": "1"}) == [
            ("STREAMER_WHATEVER_THIS_IS", None)
        ]

    def test_known_pass_through_and_other_variables_are_not_reported(self) -> None:
        """Every setting, any STREAMER_KAFKA_* and non-STREAMER_ names pass silently."""
        environ = {
            "STREAMER_CONNECT_TIMEOUT": "3",
            "STREAMER_CARD_STATE": "false",
            "STREAMER_KAFKA_SASL_MECHANISM": "PLAIN",
            "STREAMER_FAULT_SCALE": "full",
            "PATH": "/bin",
        }
        assert unknown_variables(environ) == []

    def test_every_setting_is_a_known_variable(self) -> None:
        """A new setting is known as soon as it exists (the names come from the model)."""
        known = known_variables()
        assert {"STREAMER_CONNECT_TIMEOUT", "STREAMER_LOG_LEVEL", "STREAMER_GROUP_ID"} <= known


class TestConnectTimeout:
    def test_default_and_bounds(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """15 s by default; zero or negative is refused naming the variable."""
        assert load_settings().connect_timeout == 15.0
        monkeypatch.setenv("STREAMER_CONNECT_TIMEOUT", "0")
        with pytest.raises(ConfigError, match="STREAMER_CONNECT_TIMEOUT"):
            load_settings()
