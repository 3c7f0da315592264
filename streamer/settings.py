"""Configuration: one frozen object, read once from the environment (prefix `STREAMER_`).

This is the only module that reads `os.environ`, and the only one that builds librdkafka
configuration dicts. CLI flags override the environment by being passed as keyword arguments.
`STREAMER_KAFKA_<NAME>` variables pass straight to every Kafka client as `<name>` with `_` turned
into `.` (`STREAMER_KAFKA_SECURITY_PROTOCOL=SASL_SSL` → `security.protocol`); their values are
kept as secrets and never logged.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamer.errors import ConfigError

ENV_PREFIX: Final = "STREAMER_"
KAFKA_ENV_PREFIX: Final = "STREAMER_KAFKA_"

# Settings the scorer relies on for its guarantees: a pass-through setting may not change them.
_PROTECTED_KAFKA_KEYS: Final = frozenset(
    {
        "enable.auto.offset.store",
        "enable.idempotence",
        "max.in.flight.requests.per.connection",
        "max.in.flight",
        "delivery.report.only.error",
        "acks",
        "isolation.level",
        "transactional.id",
        "group.id",
        "bootstrap.servers",
    }
)
DEFAULT_TRANSACTION_TIMEOUT_MS: Final = 60_000
"""librdkafka's default; `STREAMER_KAFKA_TRANSACTION_TIMEOUT_MS` changes it."""
_KAFKA_KEY: Final = re.compile(r"^[a-z0-9]+(\.[a-z0-9]+)*$")
_SECRET_HINTS: Final = ("password", "secret", "jaas", "token", "key", "credentials")


class Settings(BaseSettings):
    """Everything the commands need to know; immutable once built."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        frozen=True,
        extra="ignore",
        validate_default=True,
    )

    bootstrap_servers: str = Field(default="localhost:9092", min_length=1)
    """Kafka bootstrap servers, `host:port[,host:port...]`."""

    input_topic: str = "transactions"
    """Transaction events in."""

    output_topic: str = "fraud-verdicts"
    """Verdicts out."""

    dlq_topic: str = "transactions-dlq"
    """Records that could not be scored, with the reason in their headers."""

    group_id: str = Field(default="streamer", min_length=1)
    """Consumer group of the scorer."""

    model_path: Path = Path("models/fraud-model.skops")
    """The model artefact (skops); its card sits beside it as `<stem>.card.json`."""

    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Score at or above which a verdict says fraud; default: the model card's threshold."""

    shadow_model_path: Path | None = None
    """A challenger artefact scored beside the model; its verdicts go to `shadow_topic`."""

    shadow_topic: str = Field(default="fraud-verdicts-shadow", min_length=1)
    """The challenger's verdicts (only with `shadow_model_path`)."""

    processing_guarantee: Literal["at-least-once", "exactly-once"] = "at-least-once"
    """at-least-once (offsets stored after delivery) or exactly-once (Kafka transactions)."""

    log_format: Literal["console", "json"] | None = None
    """`console` or `json`; default: console on a TTY, JSON otherwise."""

    log_level: Literal["debug", "info", "warning", "error"] = "info"

    batch_size: int = Field(default=2000, ge=1, le=100_000)
    """Most records taken from the consumer per poll.

    A poll takes what is already fetched, up to this many, and never waits for a batch to fill,
    so the cap matters only under load: each batch pays fixed costs once (the model's predict
    call alone is about 0.7 ms however few rows it scores), so larger batches raise throughput
    at the price of a longer wait for the records at the end of a batch.
    """

    poll_timeout: float = Field(default=0.1, gt=0.0, le=1.0)
    """Seconds one poll waits for records; bounded at 1 s so signals are served promptly."""

    max_event_bytes: int = Field(default=64 * 1024, ge=64)
    """Values larger than this are dead-lettered unread (stage decode)."""

    progress_interval: float = Field(default=10.0, gt=0.0)
    """Seconds between progress log lines."""

    transaction_interval: float = Field(default=0.1, gt=0.0, le=30.0)
    """Exactly-once: seconds of consumed batches one transaction collects before it commits."""

    card_state: bool = True
    """Keep card history (the history features) as state with a changelog. Off, every record is
    scored as its card's first (no changelog, nothing to restore): only to measure what the state
    costs (`scripts/bench`), since the model's history features are then blank."""

    commit_interval: float = Field(default=1.0, gt=0.0, le=60.0)
    """At-least-once: seconds between commits (state changelog flushed with the outputs, then
    input offsets). A crash repeats up to this much work; each commit waits for the producer."""

    instance_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,200}$")
    """Exactly-once: this process's name in its transactional id, `<group_id>-<instance_id>`.

    Default: `<hostname>-<pid>`. Give each process a stable one (a StatefulSet's pod name, say) so
    a restart fences its predecessor's open transaction at once instead of after
    `transaction.timeout.ms`; two live processes must never share one.
    """

    schema_registry_url: str | None = None
    """Confluent Schema Registry for the input: values in its wire format (magic byte 0, schema
    id, Avro body) are read with the writer schema it names, resolved to `transaction.avsc`.
    `http(s)://[user:password@]host[:port]` (several comma-separated), or `mock://name` for the
    client's in-process mock. Unset: values are plain Avro of `transaction.avsc`."""

    metrics_port: int = Field(default=9095, ge=0, le=65535)
    """`streamer run`: the port of `/metrics`, `/livez` and `/readyz`; 0 serves none of them."""

    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    """`streamer run`: the address the metrics port listens on (`0.0.0.0`: every interface)."""

    connect_timeout: float = Field(default=15.0, gt=0.0, le=600.0)
    """Seconds a command waits at start-up for a first answer from a broker; none answering,
    it exits 1 naming the bootstrap servers."""

    http_host: str = Field(default="127.0.0.1", min_length=1)
    """`streamer serve`: the address to listen on (`0.0.0.0` for every interface)."""

    http_port: int = Field(default=8080, ge=1, le=65_535)
    """`streamer serve`: the TCP port to listen on."""

    http_token: SecretStr | None = None
    """`streamer serve`: when set, `/v1/*` requests need `Authorization: Bearer <token>`."""

    http_max_batch: int = Field(default=1000, ge=1, le=100_000)
    """`streamer serve`: most transactions in one `POST /v1/score/batch`."""

    kafka: Mapping[str, SecretStr] = Field(default_factory=dict)
    """Pass-through librdkafka settings, from `STREAMER_KAFKA_*`."""

    @field_validator("schema_registry_url")
    @classmethod
    def _valid_registry_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():  # set but empty, as compose files do: unset
            return None
        for url in value.split(","):
            parsed = urlsplit(url.strip())
            if parsed.scheme not in {"http", "https", "mock"} or not parsed.hostname:
                raise ValueError(
                    "a Schema Registry URL is http://host[:port], https://... or mock://name "
                    "(several separated by commas)"
                )
            try:
                parsed.port  # noqa: B018 (reading it checks it)
            except ValueError as exc:
                raise ValueError(f"a Schema Registry URL with a bad port: {exc}") from None
        return value

    @field_validator("input_topic", "output_topic", "dlq_topic")
    @classmethod
    def _valid_topic(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,249}", value) or value in {".", ".."}:
            raise ValueError("a topic name is 1-249 of the characters A-Z a-z 0-9 . _ -")
        return value

    @field_validator("http_token")
    @classmethod
    def _non_empty_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("an empty token; unset the variable to serve without one")
        return value

    @field_validator("kafka")
    @classmethod
    def _valid_kafka_keys(cls, value: Mapping[str, SecretStr]) -> Mapping[str, SecretStr]:
        for key in value:
            variable = kafka_variable(key)
            if not _KAFKA_KEY.match(key):
                raise ValueError(f"{variable}: {key!r} is not a librdkafka property name")
            if key in _PROTECTED_KAFKA_KEYS:
                raise ValueError(
                    f"{variable}: {key!r} is set by streamer itself; it carries the delivery "
                    "guarantee or the connection and has a variable of its own"
                )
        return value

    # -- librdkafka dicts: built here and nowhere else ------------------------------------------

    def _common(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            key: secret.get_secret_value() for key, secret in self.kafka.items()
        }
        config["bootstrap.servers"] = self.bootstrap_servers
        return config

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly-once"

    def transactional_id(self) -> str:
        """The producer's transactional id in exactly-once mode (one per process)."""
        instance = self.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        return f"{self.group_id}-{instance}"

    def consumer_config(
        self, *, group_id: str | None = None, statistics_interval_ms: int = 0
    ) -> dict[str, Any]:
        """The scorer's consumer (`statistics_interval_ms` > 0: librdkafka statistics, for lag).

        at-least-once: offsets committed by the scorer's checkpoint, only once the outputs of the
        records before them and the state changes they made are acknowledged.
        exactly-once: offsets are committed by the producer's transactions, never by the consumer,
        and only committed input is read.
        """
        config: dict[str, Any] = {
            "group.id": group_id or self.group_id,
            "auto.offset.reset": "earliest",
            # Offsets are committed by the checkpoint (`kafka.checkpoint`), never automatically:
            # an offset may be committed only after the state changes it made are in the changelog.
            "enable.auto.offset.store": False,
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            # Cooperative rebalancing would move partitions one at a time; eager keeps the revoke
            # callback (where we flush and commit) simple and complete.
            "partition.assignment.strategy": "range,roundrobin",
            "fetch.wait.max.ms": 10,
            # librdkafka prefetches up to 64 MiB per consumer by default, and holding a fetched
            # event costs about three times its size. 2 MiB (about 10,000 events, a fifth of a
            # second of scoring) keeps batches ready as long as a full queue pauses fetching for
            # 10 ms rather than the default second: a smaller queue empties before a second is
            # up. Against 16 MiB with the default pause, peak RSS is about 60 MB lower at the same
            # throughput; the pause matters only with a backlog, never to latency.
            "queued.max.messages.kbytes": 2048,
            "fetch.queue.backoff.ms": 10,
            "session.timeout.ms": 45_000,
            "max.poll.interval.ms": 300_000,
        }
        if self.exactly_once:
            config["isolation.level"] = "read_committed"
        if statistics_interval_ms > 0:
            config["statistics.interval.ms"] = statistics_interval_ms
        config.update(self._common())
        return config

    def changelog_reader_config(self) -> dict[str, Any]:
        """The consumer that restores state from changelog topics (assigned, never subscribed).

        It commits nothing and joins no group; exactly-once reads committed changelog records only.
        """
        config: dict[str, Any] = {
            "group.id": f"{self.group_id}.changelog-reader",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed" if self.exactly_once else "read_uncommitted",
            # A restore ends at the first empty fetch of each partition (its end of partition):
            # the broker's default wait for data (500 ms) would be added to every restore.
            "fetch.wait.max.ms": 10,
            # A restore reads faster than it applies, so the fetch queue is soon over its
            # threshold, and librdkafka then pauses fetching that partition for a second by
            # default: a restore of 150,000 records spent half its time waiting for those pauses
            # to end (1.3 s against 0.65 s with 10 ms).
            "fetch.queue.backoff.ms": 10,
            # A consume call takes 10,000 records (about 5 MB of card histories): 16 MiB of
            # prefetch keeps the next ones ready. librdkafka's default, 64 MiB, restored a
            # million cards no faster and peaked about 50 MB higher.
            "queued.max.messages.kbytes": 16384,
        }
        config.update(self._common())
        return config

    def replica_reader_config(self) -> dict[str, Any]:
        """`streamer serve`'s changelog follower: assigned every partition, never subscribed.

        It joins no group and commits nothing (the group id only names it to the broker), and
        always reads committed records: an aborted exactly-once transaction's state is never
        served.
        """
        config: dict[str, Any] = {
            "group.id": f"{self.group_id}.serve-replica",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "isolation.level": "read_committed",
            "fetch.wait.max.ms": 50,
            # Catching up reads faster than it applies: see `changelog_reader_config`.
            "fetch.queue.backoff.ms": 10,
            "queued.max.messages.kbytes": 16384,
        }
        config.update(self._common())
        return config

    def producer_config(self, *, transactional: bool = False) -> dict[str, Any]:
        """The scorer's producer: idempotent, every replica acknowledges, small linger.

        `transactional` (exactly-once mode) adds the transactional id; a record must then be
        delivered within the transaction timeout, so `delivery.timeout.ms` follows it. Its
        delivery reports are for failures only: a transaction commits once every output is
        delivered, so a report per success would be work (a Python call per record) for nothing.
        """
        config: dict[str, Any] = {
            "enable.idempotence": True,
            "acks": "all",
            # A record the broker never acknowledges stops the scorer; it is not dropped, so give
            # the broker time to recover from a leader change before declaring failure.
            "delivery.timeout.ms": 120_000,
            # One produce request in flight per broker. With more, a batch that a partition's
            # leader refuses (NOT_LEADER right after the topic was created or its leader moved)
            # can be followed by one the broker accepts; for a producer id it holds no state
            # for, the broker takes the later sequence as the first, and librdkafka reports the
            # refused batch as delivered ("implicitly acked", offset unknown) though it never
            # was: silent loss (confluent-kafka-go#921; reproduced with librdkafka 2.16 and
            # Kafka 4.4, transactional producers included). The cost is in README "Performance".
            "max.in.flight.requests.per.connection": 1,
            # Waiting up to 5 ms to fill a produce request batches well under load; at low rates
            # it adds up to 5 ms to each verdict's latency, as it does to the pass-through's.
            "linger.ms": 5,
            "batch.num.messages": 10_000,
            # Unacknowledged outputs held (about 1 s of scoring): bounds memory when the broker
            # is slow; past it, producing waits for acknowledgements instead of buffering.
            "queue.buffering.max.messages": 50_000,
            "compression.type": "lz4",
        }
        common = self._common()
        if transactional:
            timeout = int(common.get("transaction.timeout.ms", DEFAULT_TRANSACTION_TIMEOUT_MS))
            config["transactional.id"] = self.transactional_id()
            config["transaction.timeout.ms"] = timeout
            config["delivery.timeout.ms"] = timeout
            config["delivery.report.only.error"] = True
            # Once every broker is down, librdkafka by default starts again from the bootstrap
            # servers and decommissions the brokers it knew, yet keeps one of them cached as the
            # consumer group's coordinator: a send_offsets_to_transaction after the brokers are
            # back then waits for that broker's state to change, which never comes (librdkafka
            # #5511; seen after every broker was killed and started again on the same addresses).
            # Without re-bootstrapping, the known brokers reconnect where they were.
            config["metadata.recovery.strategy"] = "none"
        config.update(common)
        return config

    def reader_config(self, group_id: str) -> dict[str, Any]:
        """Consumers of the user tools that read without committing (tail, demo)."""
        config = {
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "latest",
            "enable.partition.eof": False,
            "fetch.wait.max.ms": 10,
        }
        config.update(self._common())
        return config

    def admin_config(self) -> dict[str, Any]:
        return self._common()

    def loggable(self) -> dict[str, Any]:
        """The configuration without secrets: pass-through Kafka values are masked."""
        shown = self.model_dump(exclude={"kafka"}, mode="json")
        if self.schema_registry_url is not None:
            shown["schema_registry_url"] = _mask_userinfo(self.schema_registry_url)
        shown["kafka"] = {key: _mask(key, secret) for key, secret in self.kafka.items()}
        return shown


def kafka_variable(key: str) -> str:
    """The `STREAMER_KAFKA_*` variable that sets librdkafka property `key`."""
    return KAFKA_ENV_PREFIX + key.upper().replace(".", "_")


OTHER_VARIABLES: Final = frozenset({"STREAMER_FAULT_SCALE", "STREAMER_FAULT_RESULTS"})
"""`STREAMER_` variables that are not settings: the fault suite's (`scripts/fault`)."""


def known_variables() -> frozenset[str]:
    """Every `STREAMER_*` variable name the project reads (`STREAMER_KAFKA_*` aside)."""
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields if name != "kafka"}
    return frozenset(fields) | OTHER_VARIABLES


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """(name, closest known name or None) of each `STREAMER_*` variable nothing reads: a typo.

    `STREAMER_KAFKA_*` variables pass to librdkafka, which judges them (`kafka.clients`).
    """
    environ = os.environ if environ is None else environ
    known = known_variables()
    unknown = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in known:
            continue
        if name.startswith(KAFKA_ENV_PREFIX) and len(name) > len(KAFKA_ENV_PREFIX):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        unknown.append((name, close[0] if close else None))
    return unknown


def masked_kafka_value(key: str, secret: SecretStr) -> str:
    """A pass-through value as it may be shown: masked when it may be a secret."""
    return _mask(key, secret)


def _mask(key: str, secret: SecretStr) -> str:
    if any(hint in key for hint in _SECRET_HINTS) or key.startswith("sasl."):
        return "**********"
    return secret.get_secret_value()


def _mask_userinfo(urls: str) -> str:
    """`https://user:password@host` → `https://**********@host` (the credentials stay secret)."""
    return ",".join(re.sub(r"(?<=://)[^/@]*@", "**********@", url) for url in urls.split(","))


def kafka_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`STREAMER_KAFKA_SASL_PASSWORD=x` → `{"sasl.password": "x"}`."""
    return {
        name.removeprefix(KAFKA_ENV_PREFIX).lower().replace("_", "."): value
        for name, value in environ.items()
        if name.startswith(KAFKA_ENV_PREFIX) and len(name) > len(KAFKA_ENV_PREFIX)
    }


def load_settings(**overrides: Any) -> Settings:
    """Build Settings from the environment, then flags (`overrides`, None meaning "not given").

    Raises `ConfigError` naming each bad variable (or flag) and what is wrong with it.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    environ = os.environ
    kafka = {key: SecretStr(value) for key, value in kafka_env(environ).items()}
    try:
        return Settings(kafka=kafka, **given)
    except pydantic.ValidationError as exc:
        raise ConfigError(_describe(exc, given)) from None


def _describe(exc: pydantic.ValidationError, flags: Mapping[str, Any]) -> str:
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        field = loc[0] if loc else "?"
        if field == "kafka":
            source = ""
        elif field in flags:
            source = f"--{field.replace('_', '-')}"
        else:
            source = f"{ENV_PREFIX}{field.upper()}"
        message = error["msg"].removeprefix("Value error, ")
        value = error.get("input")
        if field == "schema_registry_url" and isinstance(value, str):
            value = _mask_userinfo(value)
        got = "" if field == "kafka" or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"{source}: {message}{got}" if source else message)
    return "invalid configuration: " + "; ".join(lines)
