"""streamer: card transactions in from Kafka, fraud verdicts out, scored in-process."""

__version__ = "0.1.0"
