"""structlog set-up: coloured console lines on a TTY, one JSON object per line otherwise.

Logs go to stderr so that commands whose output is data (`streamer tail`) keep stdout clean.
librdkafka's own log lines are routed through the stdlib logger `streamer.kafka.client` and so
come out in the same format.
"""

from __future__ import annotations

import logging
import sys
from typing import Final

import structlog

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure_logging(log_format: str | None = None, level: str = "info") -> None:
    """Configure structlog and the stdlib root logger once, for the whole process."""
    if log_format is None:
        log_format = "console" if sys.stderr.isatty() else "json"
    numeric_level = _LEVELS[level]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Look up sys.stderr when a logger is built, not once at set-up, so redirecting stderr
        # (tests, embedding) is followed.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    # Route stdlib logging (librdkafka via confluent-kafka's `logger` option) through structlog.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
