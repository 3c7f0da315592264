"""`streamer serve` on a real broker: its card histories follow the stream's changelog, and a
request scores exactly as the stream's verdict for the same record at the same point."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from streamer.kafka.changelog import changelog_topic, ensure_changelog
from streamer.synthetic import LabelledTransaction, SyntheticWorld
from tests.conftest import ROOT, Topics
from tests.integration.support import run_scorer, scorer_env, streamer_command
from tests.integration.test_state import publish_events, scores_by_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

TOKEN = "integration-token-5f1c0a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Server:
    """A `streamer serve` process and a client for it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._log_file = log.open("w")
        self.process = subprocess.Popen(
            streamer_command("serve"),
            env={**env, "STREAMER_HTTP_PORT": str(self.port), "STREAMER_HTTP_TOKEN": TOKEN},
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        self.client = httpx2.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return self.client.get("/readyz").status_code == 200
        except httpx2.TransportError:
            return False

    def score(self, record: dict[str, Any]) -> dict[str, Any]:
        response = self.client.post("/v1/score", json=record, headers=AUTH)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def stop(self) -> int:
        """Stop it (SIGTERM) and return its exit status."""
        if self.process.poll() is None:
            self.client.close()
            self.process.terminate()
            self.process.wait(30)
            self._log_file.close()
        return self.process.returncode


@pytest.fixture
def events() -> tuple[list[LabelledTransaction], list[LabelledTransaction]]:
    """A history, and each card's next transaction after it (held out)."""
    generated = list(SyntheticWorld(31, n_cards=80).generate(2_400))
    held: dict[str, LabelledTransaction] = {}
    for event in reversed(generated):
        held.setdefault(event.record["card_id"], event)
    held_ids = {event.record["transaction_id"] for event in held.values()}
    history = [event for event in generated if event.record["transaction_id"] not in held_ids]
    return history, sorted(held.values(), key=lambda event: event.record["event_time"])


@pytest.fixture
def server(
    bootstrap_servers: str, topics: Topics, model_path: Path, tmp_path: Path
) -> Iterator[Server]:
    env = scorer_env(
        bootstrap_servers, topics, model_path, STREAMER_PROCESSING_GUARANTEE="exactly-once"
    )
    # As `streamer topics create` does; the server waits for the changelog topic otherwise.
    config = {"bootstrap.servers": bootstrap_servers}
    ensure_changelog(config, changelog_topic(topics.group, "card-state"), topics.input)
    serving = Server(env, tmp_path / "serve.log")
    yield serving
    serving.stop()


class TestParity:
    def test_a_request_scores_as_the_streams_next_verdict(
        self,
        bootstrap_servers: str,
        topics: Topics,
        model_path: Path,
        server: Server,
        events: tuple[list[LabelledTransaction], list[LabelledTransaction]],
    ) -> None:
        """Stream quiescent, replica caught up: /v1/score's score of each card's next
        transaction equals the verdict the stream gives that transaction when it arrives."""
        history, held = events
        env = scorer_env(
            bootstrap_servers, topics, model_path, STREAMER_PROCESSING_GUARANTEE="exactly-once"
        )
        publish_events(bootstrap_servers, topics.input, history)
        first = run_scorer(env)
        assert first.returncode == 0, first.stderr[-3000:]

        wait_for(server.ready, 90, "the server to be ready")
        wait_for(lambda: server.client.get("/readyz").json()["lag_records"] == 0, 30, "no lag")
        online = {event.record["transaction_id"]: server.score(event.record) for event in held}
        assert all(body["history"]["found"] for body in online.values())
        batch = server.client.post(
            "/v1/score/batch", json={"transactions": [e.record for e in held]}, headers=AUTH
        ).json()
        assert [r["verdict"]["score"] for r in batch["results"]] == [
            online[e.record["transaction_id"]]["verdict"]["score"] for e in held
        ], "a batch of distinct cards scores as single requests"

        publish_events(bootstrap_servers, topics.input, held)
        second = run_scorer(env)
        assert second.returncode == 0, second.stderr[-3000:]
        streamed = scores_by_id(bootstrap_servers, topics.output)
        differing = [
            tid for tid, body in online.items() if streamed[tid] != [body["verdict"]["score"]]
        ]
        assert differing == [], f"{len(differing)} of {len(online)} scores differ from the stream"

        # The replica keeps following: the stream's new histories (with the held-out records in
        # them) reach it, and the same request now meets the newer history.
        record = held[0].record
        before = online[record["transaction_id"]]["history"]["changelog_offset"]
        wait_for(
            lambda: server.score(record)["history"]["changelog_offset"] != before,
            30,
            "the replica to read the stream's newer history",
        )
        assert (
            server.score(record)["verdict"]["score"]
            != online[record["transaction_id"]]["verdict"]["score"]
        )

        text = server.client.get("/metrics").text
        assert "streamer_replica_ready 1.0" in text
        assert server.stop() == 0
        assert TOKEN not in server.log.read_text()


class TestGuards:
    def test_token_and_refusals_on_the_real_server(
        self, server: Server, events: tuple[list[LabelledTransaction], Any]
    ) -> None:
        """401 without the token (nothing scored); the dead-letter words for a bad one."""
        wait_for(server.ready, 90, "the server to be ready")
        record = events[0][0].record
        refused = server.client.post("/v1/score", json=record)
        assert refused.status_code == 401
        metrics = server.client.get("/metrics").text
        assert "streamer_http_transactions_scored_total 0.0" in metrics
        bad = server.client.post("/v1/score", json={**record, "currency": "ZZZ"}, headers=AUTH)
        assert bad.status_code == 422
        assert bad.json()["error"]["reason"] == (
            "currency: unknown ISO 4217 currency code (got 'ZZZ')"
        )
        huge = server.client.post("/v1/score", content=b" " * 100_000, headers=AUTH)
        assert huge.status_code == 413
        assert server.score(record)["history"]["found"] is False
        assert server.stop() == 0
        assert TOKEN not in server.log.read_text()
