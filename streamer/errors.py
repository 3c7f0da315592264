"""The one error hierarchy.

Errors about a single record know their dead-letter stage; the scorer turns them into dead letters
and carries on. Every other error stops the process with a message that says why.
"""

from __future__ import annotations

from typing import ClassVar, Literal

DeadLetterStage = Literal["decode", "validate", "score"]


class StreamerError(Exception):
    """Base of every error the package raises on purpose."""


class ConfigError(StreamerError):
    """The configuration is invalid; raised before anything touches Kafka."""


class MissingTopicError(ConfigError):
    """A topic the command needs does not exist (or cannot be used); nothing was done."""


class ModelRefusedError(StreamerError):
    """The model artefact cannot be trusted or does not match its card; nothing is scored."""


class DeliveryFailedError(StreamerError):
    """The broker did not acknowledge a verdict or dead letter; the scorer must stop, not skip."""


class KafkaFatalError(StreamerError):
    """A Kafka client reported an error it cannot recover from."""


class BrokerUnreachableError(StreamerError):
    """No broker answered at start-up within the connect timeout."""


class StalledError(KafkaFatalError):
    """A Kafka client call blocked far past its own timeout; the process ends to be restarted."""


class FencedError(StreamerError):
    """Exactly-once: another scorer took over this one's partitions or transactional id.

    Whatever this process wrote in its open transaction is aborted; it must stop and be restarted.
    """


class DataFileError(StreamerError):
    """A data file (`streamer score`, `train --data`, `features`) cannot be used as a whole:
    unreadable, a column missing or of the wrong type, or a bad row where every row must be good.
    The message names the file, and the row and column when there is one."""


class RecordError(StreamerError):
    """A single record cannot be scored; it goes to the dead-letter topic with this reason."""

    stage: ClassVar[DeadLetterStage]


class DecodeError(RecordError):
    """The value is not a Transaction in Avro binary (or is absent, or too large)."""

    stage = "decode"


class ValidationError(RecordError):
    """The value decodes but breaks a domain rule (negative amount, unknown currency, no key...)."""

    stage = "validate"


class ScoreError(RecordError):
    """The model could not score the record (a non-finite feature or score)."""

    stage = "score"


class SchemaRegistryUnavailableError(StreamerError):
    """The Schema Registry could not be asked for a writer schema (down, refusing, too slow).

    No fault of the records: the batch that needed the schema is read again after a back-off,
    and nothing of it is dead-lettered.
    """
