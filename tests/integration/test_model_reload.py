"""Model reload on a real broker: a new model renamed into place mid-stream takes over at one
offset per partition, a corrupt one is refused while the running model carries on, and every
transaction gets exactly one verdict."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from streamer.kafka.clients import OutputProducer
from streamer.model.artifact import card_path_for, load_model
from streamer.serde import decode_verdict
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from streamer.tools.produce import ProduceReport, publish
from tests.conftest import Topics, resave_model
from tests.integration.support import committed_offsets, read_all, scorer_env, start_scorer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RATE = 2_000.0
"""Events per second, produced without a pause until both changes have landed."""


def _replace_by_rename(source: Path, target: Path) -> None:
    """Move the pair at `source` over the pair at `target`, artefact first (as `save_model`)."""
    os.replace(source, target)
    os.replace(card_path_for(source), card_path_for(target))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _metric(port: int, name: str) -> float | None:
    """The value of an unlabelled sample of the scorer's /metrics (None: not served yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


@pytest.mark.parametrize("guarantee", ["at-least-once", "exactly-once"])
def test_models_swapped_mid_stream(
    bootstrap_servers: str, topics: Topics, model_path: Path, tmp_path: Path, guarantee: str
) -> None:
    serving = tmp_path / "fraud-model.skops"
    shutil.copy(model_path, serving)
    shutil.copy(card_path_for(model_path), card_path_for(serving))
    old_version = load_model(serving).card.version
    staged = tmp_path / "staged" / "fraud-model.skops"
    new_card = resave_model(serving, staged, threshold=0.3)
    assert new_card.version != old_version

    stop = threading.Event()
    sent: list[LabelledTransaction] = []
    reports: list[ProduceReport] = []
    producing = threading.Thread(
        target=lambda: reports.append(
            publish(
                OutputProducer({"bootstrap.servers": bootstrap_servers}),
                topics.input,
                itertools.takewhile(
                    lambda _: not stop.is_set(), SyntheticWorld(808).generate(1_000_000)
                ),
                rate=RATE,
                on_sent=sent.append,
            )
        )
    )
    port = _free_port()
    env = scorer_env(
        bootstrap_servers,
        topics,
        serving,
        STREAMER_PROCESSING_GUARANTEE=guarantee,
        STREAMER_BATCH_SIZE="200",
        STREAMER_TRANSACTION_INTERVAL="0.5",
        STREAMER_METRICS_PORT=str(port),
    )
    scorer = start_scorer(env, "--until-idle", "4")

    def wait_for(name: str, value: float) -> None:
        deadline = time.monotonic() + 60
        while _metric(port, name) != value:
            assert scorer.poll() is None, scorer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.2)

    try:
        producing.start()
        wait_for("streamer_model_reloads_total", 0)  # the scorer serves its metrics
        deadline = time.monotonic() + 60
        while not any(o > 0 for o in committed_offsets(bootstrap_servers, topics).values()):
            assert scorer.poll() is None, scorer.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the scorer made no progress"
            time.sleep(0.2)
        _replace_by_rename(staged, serving)
        wait_for("streamer_model_reloads_total", 1)
        corrupt = tmp_path / "corrupt" / "fraud-model.skops"
        corrupt.parent.mkdir()
        corrupt.write_bytes(b"PK\x03\x04 not a model")
        os.replace(corrupt, serving)  # the card stays: its sha256 no longer matches
        wait_for("streamer_model_reload_failures_total", 1)
        time.sleep(1.0)  # the new model goes on scoring after the refusal
        stop.set()
        producing.join(timeout=60)
        assert reports, "the producer did not finish"
        assert reports[0].acknowledged == len(sent), reports
        _, stderr = scorer.communicate(timeout=120)
    finally:
        stop.set()
        if scorer.poll() is None:
            scorer.send_signal(signal.SIGTERM)
            scorer.communicate(timeout=60)
    assert scorer.returncode == 0, stderr[-3000:]
    assert stderr.count('"model reloaded"') == 1, stderr[-3000:]
    assert stderr.count('"new model refused, the running model keeps serving"') == 1

    verdicts = read_all(bootstrap_servers, topics.output)
    decoded = [(record, decode_verdict(record.value or b"")) for record in verdicts]
    ids = Counter(verdict["transaction_id"] for _, verdict in decoded)
    assert set(ids) == {event.record["transaction_id"] for event in sent}, "0 missing"
    assert max(ids.values()) == 1, "0 duplicates"

    by_partition: dict[int, list[tuple[int, str, float]]] = defaultdict(list)
    for record, verdict in decoded:
        source_partition = int(record.headers["streamer.source.partition"])
        by_partition[source_partition].append(
            (
                int(record.headers["streamer.source.offset"]),
                verdict["model_version"],
                verdict["threshold"],
            )
        )
    switched = 0
    for rows in by_partition.values():
        rows.sort()
        versions = [version for _, version, _ in rows]
        # One switch at one offset: every verdict before it is the old model's, every one after
        # it the new model's (the corrupt artefact changed nothing).
        changes = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
        assert len(changes) <= 1, f"more than one switch: {changes}"
        assert versions[0] == old_version
        if changes:
            switched += 1
            assert set(versions[changes[0] :]) == {new_card.version}
            assert all(t == pytest.approx(0.3) for _, _, t in rows[changes[0] :])
    assert switched == len(by_partition) == 3, "every partition switched mid-stream"
