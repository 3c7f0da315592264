"""Shared fixtures: a real Kafka broker for integration tests, and a small trained model.

The broker is the one named by STREAMER_BOOTSTRAP_SERVERS when set; otherwise the session starts
a private one with `scripts/kafka-local` on free ports and a temporary data folder, and stops it
at the end. Every test gets its own uuid-named topics and consumer group.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from streamer.model.artifact import ModelCard

ROOT = Path(__file__).resolve().parent.parent
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault: the fault suite (crashes, broker failures, hostile input), reconciled by "
        "`streamer audit`; short form here, long form with scripts/fault",
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def bootstrap_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap address of a running broker (reused from the environment, or started here)."""
    given = os.environ.get("STREAMER_BOOTSTRAP_SERVERS")
    if given:
        yield given
        return
    env = {
        **os.environ,
        "KAFKA_LOCAL_PORT": str(_free_port()),
        "KAFKA_LOCAL_CONTROLLER_PORT": str(_free_port()),
        "KAFKA_LOCAL_DATA": str(tmp_path_factory.mktemp("kafka")),
    }
    started = subprocess.run(
        [str(KAFKA_LOCAL), "start"], env=env, capture_output=True, text=True, timeout=600
    )
    if started.returncode != 0:
        pytest.fail(f"local broker did not start:\n{started.stdout}\n{started.stderr}")
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(KAFKA_LOCAL), "stop"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model trained for the test session (never committed)."""
    from streamer.model.train import train_model

    path = tmp_path_factory.mktemp("model") / "fraud-model.skops"
    train_model(path, seed=11, size=30_000)
    return path


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dlq: str
    group: str


def fresh_topics(bootstrap: str, *, replication_factor: int = 1) -> Topics:
    """Create fresh input, output and dead-letter topics (3 partitions each); a fresh group."""
    from streamer.kafka.admin import ensure_topics

    suffix = uuid.uuid4().hex[:12]
    names = Topics(
        input=f"transactions-{suffix}",
        output=f"verdicts-{suffix}",
        dlq=f"dlq-{suffix}",
        group=f"streamer-{suffix}",
    )
    ensure_topics(
        {"bootstrap.servers": bootstrap},
        [names.input, names.output, names.dlq],
        partitions=3,
        replication_factor=replication_factor,
    )
    return names


@pytest.fixture
def topics(bootstrap_servers: str) -> Topics:
    """Fresh input, output and dead-letter topics (3 partitions each) and a fresh group."""
    return fresh_topics(bootstrap_servers)


def resave_model(source: Path, target: Path, **card_changes: Any) -> ModelCard:
    """Save the model at `source` again at `target` as a new version (other bytes, other sha256).

    The estimator is the same fitted one with its `random_state` parameter changed, which only
    fitting reads: scores are unchanged, the artefact (and so its version) is new. `card_changes`
    (a threshold, say) go into the new card.
    """
    from streamer.model.artifact import load_model, save_model

    loaded = load_model(source)
    estimator = loaded.estimator
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    final.set_params(random_state=(final.get_params().get("random_state") or 0) + 1)
    card = loaded.card.model_copy(update=card_changes)
    return save_model(estimator, card, target)
