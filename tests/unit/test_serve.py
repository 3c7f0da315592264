"""`streamer serve` without a broker: the HTTP API over a replica filled by hand."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError
from fastapi.testclient import TestClient
from structlog.testing import capture_logs

from streamer.errors import ConfigError
from streamer.model.artifact import card_path_for
from streamer.model.scorer import Scorer
from streamer.model.slot import ModelSlot
from streamer.pipeline import Histories, Pipeline
from streamer.serde import decode_and_validate, decode_verdict, encode_transaction
from streamer.serve.http import ITEM_BODY_BYTES, create_app
from streamer.serve.replica import CardEntry, CardReplica, ReplicaStatus
from streamer.serve.scoring import (
    Coalescer,
    ItemResult,
    OnlineScorer,
    OverloadedError,
    to_record,
)
from streamer.settings import load_settings
from streamer.state.card import CARD_HISTORY_CODEC, CardHistory
from streamer.synthetic import SyntheticWorld
from tests.conftest import resave_model

MAX_EVENT_BYTES = 64 * 1024
TOKEN = "s3cret-token-value"


class FakeReplica:
    """Card histories set by the test; `status` says caught up unless told otherwise."""

    def __init__(self, cards: dict[str, CardEntry]) -> None:
        self.cards = cards
        self.caught_up = True
        self.error: str | None = None
        self.started = False
        self.fail_history = False

    def card(self, card_id: str) -> CardEntry | None:
        return self.cards.get(card_id)

    def history(self, card_id: str, entry: CardEntry) -> CardHistory:
        if self.fail_history:
            raise RuntimeError("boom in /srv/streamer/replica.py line 12")
        return CARD_HISTORY_CODEC.decode(entry.value)

    @property
    def alive(self) -> bool:
        return self.error is None

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            topic="g-card-state-changelog",
            caught_up_once=self.caught_up,
            caught_up=self.caught_up,
            lag_records=0 if self.caught_up else 7,
            seconds_since_caught_up=0.0 if self.caught_up else None,
            cards=len(self.cards),
            records=len(self.cards),
            partitions=3,
            error=self.error,
        )

    def start(self) -> None:
        self.started = True

    def stop(self, timeout: float = 10.0) -> None:
        self.started = False


@pytest.fixture(scope="module")
def scorer(model_path: Path) -> Scorer:
    return Scorer.from_path(model_path)


@pytest.fixture(scope="module")
def world() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A history (scored first) and, per card, its next transaction (held out)."""
    records = [event.record for event in SyntheticWorld(5, n_cards=40).generate(1_500)]
    held: dict[str, dict[str, Any]] = {}
    for record in reversed(records):
        held.setdefault(record["card_id"], record)
    held_ids = {record["transaction_id"] for record in held.values()}
    history = [record for record in records if record["transaction_id"] not in held_ids]
    return history, list(held.values())


def stream_histories(scorer: Scorer, records: list[dict[str, Any]]) -> dict[str, CardHistory]:
    """The card histories the stream holds after scoring `records`."""
    histories = Histories()
    values = [encode_transaction(record) for record in records]
    keys = [record["card_id"].encode() for record in records]
    Pipeline(scorer, max_event_bytes=MAX_EVENT_BYTES).process(values, keys, histories)
    return histories.histories


@pytest.fixture
def replica(scorer: Scorer, world: tuple[list[dict[str, Any]], Any]) -> FakeReplica:
    histories = stream_histories(scorer, world[0])
    cards = {
        card: CardEntry(CARD_HISTORY_CODEC.encode(history), 1, offset, 1_767_225_600_000)
        for offset, (card, history) in enumerate(sorted(histories.items()))
    }
    return FakeReplica(cards)


def make_client(scorer: Scorer, replica: FakeReplica, **options: Any) -> TestClient:
    pipeline = Pipeline(scorer, max_event_bytes=options.pop("max_event_bytes", MAX_EVENT_BYTES))
    app = create_app(
        OnlineScorer(pipeline, replica),
        replica,
        token=options.get("token"),
        max_batch=options.get("max_batch", 10),
    )
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(scorer: Scorer, replica: FakeReplica) -> Iterator[TestClient]:
    with make_client(scorer, replica) as test_client:
        yield test_client


def stream_score(scorer: Scorer, history: list[dict[str, Any]], record: dict[str, Any]) -> float:
    """What the stream's verdict says for `record` after `history`."""
    histories = Histories(stream_histories(scorer, history))
    scored = Pipeline(scorer, max_event_bytes=MAX_EVENT_BYTES).process(
        [encode_transaction(record)], [record["card_id"].encode()], histories
    )
    score: float = decode_verdict(scored.verdicts[0] or b"")["score"]
    return score


def dead_letter_reason(record: dict[str, Any]) -> str:
    """The reason the stream puts on this record's dead letter."""
    batch = decode_and_validate(
        [encode_transaction(record)], [record["card_id"].encode()], MAX_EVENT_BYTES
    )
    [(_, error)] = batch.errors
    return str(error)


class TestScore:
    def test_verdict_equals_the_stream_verdict_with_the_cards_history(
        self, client: TestClient, scorer: Scorer, world: Any
    ) -> None:
        """Every held-out transaction scores as the stream would score it next."""
        history, held = world
        for record in held[:10]:
            response = client.post("/v1/score", json=record)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["verdict"]["score"] == stream_score(scorer, history, record)
            assert body["verdict"]["transaction_id"] == record["transaction_id"]
            assert body["verdict"]["model_version"] == scorer.version
            assert body["history"]["found"] is True
            assert body["replica"]["lag_records"] == 0

    def test_a_request_leaves_the_history_unchanged(
        self, client: TestClient, replica: FakeReplica, world: Any
    ) -> None:
        """The same transaction twice gets the same score: the first did not add to the card."""
        record = world[1][0]
        before = dict(replica.cards)
        first = client.post("/v1/score", json=record).json()
        second = client.post("/v1/score", json=record).json()
        assert first["verdict"]["score"] == second["verdict"]["score"]
        assert replica.cards == before

    def test_an_unknown_card_is_scored_as_its_first_transaction(
        self, client: TestClient, scorer: Scorer, world: Any
    ) -> None:
        record = {**world[1][0], "card_id": "card-never-seen"}
        body = client.post("/v1/score", json=record).json()
        assert body["history"] == {
            "found": False,
            "partition": None,
            "changelog_offset": None,
            "updated_at": None,
        }
        assert body["verdict"]["score"] == stream_score(scorer, [], record)

    def test_event_time_as_rfc3339(self, client: TestClient, world: Any) -> None:
        """An RFC 3339 event time is the same instant as its epoch milliseconds."""
        record = world[1][0]
        text = datetime.fromtimestamp(record["event_time"] / 1000, UTC).isoformat()
        by_millis = client.post("/v1/score", json=record).json()
        by_text = client.post("/v1/score", json={**record, "event_time": text}).json()
        assert by_text["verdict"] == {**by_millis["verdict"], "scored_at": ANY_INT}
        assert by_text["verdict"]["event_time"] == record["event_time"]

    def test_an_integer_amount_is_a_double(self, client: TestClient, world: Any) -> None:
        record = {**world[1][0], "amount": 25}
        assert client.post("/v1/score", json=record).status_code == 200


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)


ANY_INT: Any = _AnyInt()


class TestRefusals:
    def test_a_broken_rule_gets_the_dead_letter_reason_and_field(
        self, client: TestClient, world: Any
    ) -> None:
        """422 names the field with the very words of the stream's dead letter."""
        record = {**world[1][0], "currency": "XXQ", "amount": -3.0}
        response = client.post("/v1/score", json=record)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["stage"] == "validate"
        assert error["reason"] == dead_letter_reason(record)
        assert "currency: unknown ISO 4217 currency code" in error["reason"]
        assert error["fields"] == ["amount", "currency"]

    @pytest.mark.parametrize(
        ("change", "field", "words"),
        [
            ({"amount": "12.5"}, "amount", "amount: Input should be a valid number"),
            ({"card_present": None}, "card_present", "card_present: Input should be a valid"),
            ({"colour": "red"}, "colour", "colour: Extra inputs are not permitted"),
            ({"event_time": "yesterday"}, "event_time", "event_time: not epoch milliseconds"),
            ({"event_time": "2026-11-30T12:00:00"}, "event_time", "needs an offset"),
        ],
    )
    def test_a_malformed_field_is_named(
        self, client: TestClient, world: Any, change: dict[str, Any], field: str, words: str
    ) -> None:
        response = client.post("/v1/score", json={**world[1][0], **change})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["fields"] == [field]
        assert words in error["reason"]

    def test_a_missing_field_is_named(self, client: TestClient, world: Any) -> None:
        record = dict(world[1][0])
        del record["merchant_id"]
        error = client.post("/v1/score", json=record).json()["error"]
        assert error["stage"] == "validate"
        assert error["reason"].startswith("merchant_id: Field required")
        assert error["fields"] == ["merchant_id"]

    def test_not_json_is_400(self, client: TestClient) -> None:
        response = client.post("/v1/score", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"]["reason"].startswith("body is not JSON")

    def test_an_oversized_body_is_refused_unread(self, client: TestClient) -> None:
        """413 from the declared length alone, and from a body longer than it says."""
        response = client.post("/v1/score", content=b"x" * (ITEM_BODY_BYTES + 1))
        assert response.status_code == 413
        assert "exceeds the limit of 8192 bytes" in response.json()["error"]["reason"]

        def chunks() -> Iterator[bytes]:
            yield b"[" + b" " * 5000
            yield b" " * 5000 + b"]"

        streamed = client.post("/v1/score", content=chunks())
        assert streamed.status_code == 413

    def test_an_oversized_avro_value_gets_the_decode_reason(
        self, scorer: Scorer, replica: FakeReplica, world: Any
    ) -> None:
        """STREAMER_MAX_EVENT_BYTES applies as in the stream, with its dead-letter words."""
        with make_client(scorer, replica, max_event_bytes=64) as small:
            error = small.post("/v1/score", json=world[1][0]).json()["error"]
        assert error["stage"] == "decode"
        assert "exceeds the limit of 64 bytes" in error["reason"]

    def test_no_stack_trace_in_a_response(self, client: TestClient, replica: FakeReplica) -> None:
        replica.fail_history = True
        record = {"card_id": next(iter(replica.cards))}
        response = client.post("/v1/score", json={**SAMPLE, **record})
        assert response.status_code == 500
        assert "boom" not in response.text
        assert "Traceback" not in response.text
        assert response.json()["error"]["reason"] == "internal error; see the server log"

    def test_not_caught_up_is_503(self, client: TestClient, replica: FakeReplica) -> None:
        replica.caught_up = False
        response = client.post("/v1/score", json=SAMPLE)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"


SAMPLE: dict[str, Any] = {
    "transaction_id": "t-1",
    "event_time": "2026-11-30T12:00:00Z",
    "card_id": "card-1",
    "merchant_id": "m-1",
    "merchant_category": "grocery",
    "amount": 12.5,
    "currency": "EUR",
    "country": "FR",
    "channel": "pos",
    "card_present": True,
}


class TestBatch:
    def test_one_invalid_item_gets_its_error_and_the_rest_are_scored(
        self, client: TestClient, world: Any
    ) -> None:
        items = [dict(record) for record in world[1][:5]]
        items[2]["country"] = "ZZ"
        response = client.post("/v1/score/batch", json={"transactions": items})
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["scored"], body["refused"]) == (4, 1)
        results = body["results"]
        assert results[2] == {
            "error": {
                "stage": "validate",
                "reason": dead_letter_reason(items[2]),
                "fields": ["country"],
            }
        }
        ids = [result["verdict"]["transaction_id"] for i, result in enumerate(results) if i != 2]
        assert ids == [items[i]["transaction_id"] for i in (0, 1, 3, 4)]

    def test_batch_scores_equal_single_scores(self, client: TestClient, world: Any) -> None:
        items = world[1][:6]
        batch = client.post("/v1/score/batch", json={"transactions": items}).json()
        singles = [client.post("/v1/score", json=item).json() for item in items]
        assert [r["verdict"]["score"] for r in batch["results"]] == [
            s["verdict"]["score"] for s in singles
        ]

    def test_a_cards_transactions_in_a_batch_follow_one_another(
        self, client: TestClient, world: Any
    ) -> None:
        """The second of a card's transactions in a batch sees the first, as in the stream."""
        first = world[1][0]
        second = {**first, "transaction_id": "next", "event_time": first["event_time"] + 1000}
        body = client.post("/v1/score/batch", json={"transactions": [first, second]}).json()
        alone = client.post("/v1/score", json=second).json()
        assert body["results"][1]["verdict"]["score"] != alone["verdict"]["score"]

    def test_more_than_the_limit_is_refused(self, client: TestClient) -> None:
        response = client.post("/v1/score/batch", json={"transactions": [SAMPLE] * 11})
        assert response.status_code == 422
        assert "at most 10 in one batch (got 11)" in response.json()["error"]["reason"]

    def test_not_a_list_of_transactions(self, client: TestClient) -> None:
        response = client.post("/v1/score/batch", json=[SAMPLE])
        assert response.status_code == 422
        assert response.json()["error"]["fields"] == ["transactions"]


class TestToken:
    @pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", TOKEN])
    def test_without_the_token_401_and_nothing_scored(
        self, scorer: Scorer, replica: FakeReplica, world: Any, header: str | None
    ) -> None:
        headers = {} if header is None else {"Authorization": header}
        with make_client(scorer, replica, token=TOKEN) as guarded:
            response = guarded.post("/v1/score", json=world[1][0], headers=headers)
            batch = guarded.post(
                "/v1/score/batch", json={"transactions": [world[1][0]]}, headers=headers
            )
            metrics = guarded.get("/metrics").text
        assert response.status_code == batch.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "verdict" not in response.text
        assert "streamer_http_transactions_scored_total 0.0" in metrics

    def test_the_right_token_scores_and_is_never_logged(
        self, scorer: Scorer, replica: FakeReplica, world: Any, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        with capture_logs() as logs, make_client(scorer, replica, token=TOKEN) as guarded:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            assert guarded.post("/v1/score", json=world[1][0], headers=headers).status_code == 200
            guarded.post("/v1/score", json=world[1][0], headers={"Authorization": "Bearer x"})
        assert TOKEN not in json.dumps(logs, default=str)
        assert TOKEN not in caplog.text

    def test_probes_need_no_token(self, scorer: Scorer, replica: FakeReplica) -> None:
        with make_client(scorer, replica, token=TOKEN) as guarded:
            assert guarded.get("/livez").status_code == 200
            assert guarded.get("/readyz").status_code == 200


class TestOperations:
    def test_readyz_waits_for_the_first_catch_up(
        self, client: TestClient, replica: FakeReplica
    ) -> None:
        replica.caught_up = False
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["lag_records"] == 7
        replica.caught_up = True
        assert client.get("/readyz").json()["status"] == "ready"

    def test_livez_fails_when_the_reader_stopped(
        self, client: TestClient, replica: FakeReplica
    ) -> None:
        replica.error = "KafkaFatalError: fenced"
        response = client.get("/livez")
        assert response.status_code == 503
        assert "fenced" in response.json()["reason"]

    def test_lifespan_starts_and_stops_the_replica(
        self, scorer: Scorer, replica: FakeReplica
    ) -> None:
        with make_client(scorer, replica):
            assert replica.started
        assert not replica.started

    def test_openapi_documents_the_routes(self, client: TestClient) -> None:
        document = client.get("/openapi.json").json()
        assert {"/v1/score", "/v1/score/batch", "/livez", "/readyz", "/metrics"} <= set(
            document["paths"]
        )
        score = document["paths"]["/v1/score"]["post"]
        body = score["requestBody"]["content"]["application/json"]["schema"]
        assert "card_present" in body["properties"]
        assert {"200", "401", "413", "422", "503"} <= set(score["responses"])

    def test_metrics(self, client: TestClient, world: Any) -> None:
        client.post("/v1/score", json=world[1][0])
        client.post("/v1/score", json={**world[1][0], "currency": "XXQ"})
        text = client.get("/metrics").text
        assert 'streamer_http_requests_total{route="/v1/score",status="200"} 1.0' in text
        assert 'streamer_http_transactions_refused_total{stage="validate"} 1.0' in text
        assert "streamer_http_transactions_scored_total 1.0" in text
        assert 'streamer_http_request_duration_seconds_count{route="/v1/score"} 2.0' in text
        assert "streamer_replica_lag_records 0.0" in text
        assert "streamer_replica_ready 1.0" in text


class TestModelReload:
    def test_a_model_renamed_into_place_serves_the_next_requests(
        self, model_path: Path, tmp_path: Path, replica: FakeReplica, world: Any
    ) -> None:
        """As in `streamer run`: a new pair renamed into place is verified, warmed and swapped
        in between model calls; a corrupt one after it is refused and counted, and the model in
        use keeps serving."""
        path = tmp_path / "fraud-model.skops"
        shutil.copy(model_path, path)
        shutil.copy(card_path_for(model_path), card_path_for(path))
        first = Scorer.from_path(path)
        staged = tmp_path / "next" / path.name
        resave_model(path, staged, threshold=0.25)
        pipeline = Pipeline(first, max_event_bytes=MAX_EVENT_BYTES)
        slot = ModelSlot(first, path, check_interval=0.05)
        app = create_app(
            OnlineScorer(pipeline, replica), replica, token=None, max_batch=10, slot=slot
        )
        record = world[1][0]
        with TestClient(app) as client:
            assert client.post("/v1/score", json=record).json()["verdict"]["threshold"] != 0.25
            os.replace(staged, path)
            os.replace(card_path_for(staged), card_path_for(path))
            verdict = _eventually(
                lambda: client.post("/v1/score", json=record).json()["verdict"],
                lambda v: v["threshold"] == 0.25,
            )
            assert verdict["model_version"] != first.version
            corrupt = tmp_path / "corrupt.skops"
            corrupt.write_bytes(b"PK\x03\x04 not a model")
            os.replace(corrupt, path)
            text = _eventually(
                lambda: client.get("/metrics").text,
                lambda t: "streamer_http_model_reload_failures_total 1.0" in t,
            )
            assert "streamer_http_model_reloads_total 1.0" in text
            after = client.post("/v1/score", json=record).json()["verdict"]
            assert after["model_version"] == verdict["model_version"]


def _eventually(get: Any, good: Any, seconds: float = 20.0) -> Any:
    """`get()` until `good` of it, for at most `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        value = get()
        if good(value) or time.monotonic() > deadline:
            assert good(value), value
            return value
        time.sleep(0.05)


class CountingPipeline(Pipeline):
    def __init__(self, scorer: Scorer) -> None:
        super().__init__(scorer, max_event_bytes=MAX_EVENT_BYTES)
        self.calls: list[int] = []

    def process(self, values: Any, keys: Any, state: Any, **options: Any) -> Any:
        self.calls.append(len(values))
        return super().process(values, keys, state, **options)


class TestCoalescer:
    def run(self, coalescer: Coalescer, requests: list[list[Any]]) -> list[list[ItemResult]]:
        async def main() -> list[list[ItemResult]]:
            task = asyncio.create_task(coalescer.run())
            try:
                return list(await asyncio.gather(*(coalescer.score(r) for r in requests)))
            finally:
                task.cancel()

        return asyncio.run(main())

    def test_waiting_requests_share_one_model_call(
        self, scorer: Scorer, replica: FakeReplica, world: Any
    ) -> None:
        """Requests queued together are scored in one call, each result as if alone."""
        pipeline = CountingPipeline(scorer)
        online = OnlineScorer(pipeline, replica)
        requests = [[record] for record in world[1][:8]]
        alone = [online.score(request)[0].verdict for request in requests]
        pipeline.calls.clear()
        together = self.run(Coalescer(online, 1000), requests)
        assert pipeline.calls == [8]
        assert [r[0].verdict["score"] for r in together] == [v["score"] for v in alone]  # type: ignore[index]

    def test_requests_of_one_card_never_share_a_call(
        self, scorer: Scorer, replica: FakeReplica, world: Any
    ) -> None:
        """The second request of a card does not see the first: same score, separate calls."""
        pipeline = CountingPipeline(scorer)
        online = OnlineScorer(pipeline, replica)
        record = world[1][0]
        other = world[1][1]
        results = self.run(Coalescer(online, 1000), [[record], [other], [record]])
        assert pipeline.calls == [2, 1]
        first, third = results[0][0].verdict, results[2][0].verdict
        assert first is not None
        assert third is not None
        assert first["score"] == third["score"]

    def test_beyond_the_queue_limit_a_request_is_refused(
        self, scorer: Scorer, replica: FakeReplica, world: Any
    ) -> None:
        """Too many waiting: refused at once; the waiting one is still scored."""
        online = OnlineScorer(Pipeline(scorer, max_event_bytes=MAX_EVENT_BYTES), replica)
        coalescer = Coalescer(online, 1000, max_queued=1)

        async def main() -> list[ItemResult]:
            first = asyncio.ensure_future(coalescer.score([world[1][0]]))
            await asyncio.sleep(0)
            with pytest.raises(OverloadedError, match="1 transactions are waiting"):
                await coalescer.score([world[1][1]])
            task = asyncio.create_task(coalescer.run())
            try:
                return await first
            finally:
                task.cancel()

        [result] = asyncio.run(main())
        assert result.verdict is not None

    def test_a_failing_request_fails_alone(
        self, scorer: Scorer, replica: FakeReplica, world: Any
    ) -> None:
        class Fussy(FakeReplica):
            def history(self, card_id: str, entry: CardEntry) -> CardHistory:
                if card_id == world[1][0]["card_id"]:
                    raise RuntimeError("unreadable")
                return super().history(card_id, entry)

        online = OnlineScorer(
            Pipeline(scorer, max_event_bytes=MAX_EVENT_BYTES), Fussy(replica.cards)
        )
        coalescer = Coalescer(online, 1000)

        async def main() -> list[Any]:
            task = asyncio.create_task(coalescer.run())
            try:
                return list(
                    await asyncio.gather(
                        coalescer.score([world[1][0]]),
                        coalescer.score([world[1][1]]),
                        return_exceptions=True,
                    )
                )
            finally:
                task.cancel()

        failed, scored = asyncio.run(main())
        assert isinstance(failed, RuntimeError)
        assert scored[0].verdict is not None


class TestToRecord:
    def test_optional_fields_take_the_schema_defaults(self) -> None:
        record = to_record(SAMPLE)
        assert record["card_country"] is None
        assert record["card_avg_amount"] is None
        assert record["event_time"] == datetime(2026, 11, 30, 12, tzinfo=UTC).timestamp() * 1000

    def test_sub_millisecond_time_is_cut_not_rounded(self) -> None:
        record = to_record({**SAMPLE, "event_time": "1970-01-01T00:00:00.0019+00:00"})
        assert record["event_time"] == 1


class _Message:
    def __init__(
        self, partition: int, offset: int, key: bytes | None, value: bytes | None, eof: bool
    ) -> None:
        self._partition, self._offset, self._key, self._value = partition, offset, key, value
        self._eof = eof

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes | None:
        return self._value

    def error(self) -> KafkaError | None:
        return KafkaError(KafkaError._PARTITION_EOF) if self._eof else None

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000 + self._offset)


class TestReplicaRecords:
    def replica(self) -> CardReplica:
        replica = CardReplica({}, "g")
        replica._partitions = [0, 1]
        return replica

    def test_latest_value_wins_and_a_tombstone_deletes(self) -> None:
        replica = self.replica()
        replica._apply(
            [
                _Message(0, 0, b"a", b"one", False),
                _Message(1, 0, b"b", b"two", False),
                _Message(0, 1, b"a", b"three", False),
                _Message(1, 1, b"b", None, False),
            ]
        )
        assert replica.card("a") == CardEntry(b"three", 0, 1, 1_001)
        assert replica.card("b") is None
        assert replica.status().records == 4

    def test_ready_only_once_every_partition_reached_its_end(self) -> None:
        replica = self.replica()
        replica._high = {0: 5, 1: 9}
        replica._apply([_Message(0, 4, b"a", b"x", False), _Message(0, 5, None, None, True)])
        status = replica.status()
        assert not status.caught_up_once
        assert status.lag_records == 9
        replica._apply([_Message(1, 9, None, None, True)])
        status = replica.status()
        assert status.caught_up_once
        assert status.caught_up
        assert status.lag_records == 0
        assert status.seconds_since_caught_up == 0.0
        replica._apply([_Message(1, 9, b"c", b"y", False)])
        assert not replica.status().caught_up
        assert replica.status().caught_up_once

    def test_each_request_gets_its_own_copy_of_a_history(self, scorer: Scorer, world: Any) -> None:
        """Changing what `history` gave changes neither the replica nor the next answer."""
        replica = self.replica()
        card, history = next(iter(stream_histories(scorer, world[0][:200]).items()))
        replica._apply([_Message(0, 0, card.encode(), CARD_HISTORY_CODEC.encode(history), False)])
        entry = replica.card(card)
        assert entry is not None
        first = replica.history(card, entry)
        assert first == history
        # The pipeline changes the histories it is given in place.
        record = {**world[1][0], "card_id": card}
        Pipeline(scorer, max_event_bytes=MAX_EVENT_BYTES).process(
            [encode_transaction(record)], [card.encode()], Histories({card: first})
        )
        assert first != history
        assert replica.history(card, entry) == history

    def test_the_topic_is_the_groups_card_changelog(self) -> None:
        assert CardReplica({}, "scorers").topic == "scorers-card-state-changelog"


class TestSettings:
    def test_defaults(self) -> None:
        settings = load_settings()
        assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
        assert settings.http_token is None
        assert settings.http_max_batch == 1000

    def test_an_empty_token_is_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("STREAMER_HTTP_TOKEN", "")
        with pytest.raises(ConfigError, match=r"STREAMER_HTTP_TOKEN: .*empty token"):
            load_settings()

    def test_the_token_is_masked_in_the_logged_configuration(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("STREAMER_HTTP_TOKEN", TOKEN)
        settings = load_settings()
        assert TOKEN not in json.dumps(settings.loggable())

    def test_the_replica_reads_committed_and_commits_nothing(self) -> None:
        config = load_settings().replica_reader_config()
        assert config["isolation.level"] == "read_committed"
        assert config["enable.auto.commit"] is False
