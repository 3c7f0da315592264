"""Builds and runs `streamer serve`: model, replica and HTTP app, under uvicorn.

One process serves with one model and one changelog replica. `workers > 1` runs that many such
processes behind one listening socket (uvicorn's supervisor): each loads the model and follows the
whole changelog itself, so each holds every card's history, and a request may reach any of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI

from streamer.logging import configure_logging
from streamer.model.scorer import Scorer
from streamer.model.slot import ModelSlot
from streamer.pipeline import Pipeline
from streamer.serve.http import create_app
from streamer.serve.replica import CardReplica
from streamer.serve.scoring import OnlineScorer
from streamer.settings import ENV_PREFIX, Settings, load_settings

log = structlog.get_logger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server, exiting 0 after a graceful stop on SIGINT/SIGTERM, as `streamer run`.

    uvicorn raises the signal again once it has shut down, so the process would die of it.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def build_app(settings: Settings, scorer: Scorer | None = None) -> FastAPI:
    """The server of these settings (the model loaded here unless given)."""
    if scorer is None:
        scorer = Scorer.from_path(settings.model_path, settings.threshold)
    # `Pipeline.process` reads `pipeline.scorer` once per call: the model slot's reload assigns a
    # new verified scorer there, which applies from the next call on (`http._reload`).
    pipeline = Pipeline(scorer, max_event_bytes=settings.max_event_bytes)
    replica = CardReplica(settings.replica_reader_config(), settings.group_id)
    token = None if settings.http_token is None else settings.http_token.get_secret_value()
    log.info(
        "server starting",
        config=settings.loggable(),
        changelog_topic=replica.topic,
        **scorer.log_fields(),
        pid=os.getpid(),
    )
    return create_app(
        OnlineScorer(pipeline, replica),
        replica,
        token=token,
        max_batch=settings.http_max_batch,
        slot=ModelSlot(scorer, settings.model_path, threshold=settings.threshold),
    )


def app_from_environment() -> FastAPI:
    """A worker process's app (`workers > 1`): settings from the environment, as the parent's."""
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    return build_app(settings)


def serve(settings: Settings, *, workers: int = 1, overrides: Mapping[str, Any] = {}) -> None:
    """Serve until SIGINT or SIGTERM (uvicorn finishes the requests in flight, then exits).

    `overrides`: the settings given as flags, passed on to worker processes through their
    environment so that each builds the same `Settings`.
    """
    # Loaded here even with workers: a refused model stops the command before anything listens.
    scorer = Scorer.from_path(settings.model_path, settings.threshold)
    options: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "log_config": None,  # uvicorn's loggers go through the process's structlog set-up
        "access_log": False,  # one line per request costs more than the request; see /metrics
        "server_header": False,
        "timeout_graceful_shutdown": 10,
    }
    if workers == 1:
        _Server(uvicorn.Config(build_app(settings, scorer), **options)).run()
        return
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    log.info("starting worker processes", workers=workers)
    uvicorn.run(
        "streamer.serve.server:app_from_environment", factory=True, workers=workers, **options
    )
