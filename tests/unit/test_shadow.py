"""Shadow scoring: the challenger scores the champion's feature rows, its verdicts go to the
shadow topic, it never changes a verdict, and a failing challenger is switched off."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import structlog

from streamer.errors import DeliveryFailedError
from streamer.metrics import ScorerMetrics
from streamer.model.artifact import card_path_for
from streamer.model.scorer import Scorer
from streamer.serde import decode_verdict, encode_transaction
from streamer.settings import Settings
from streamer.shadow import Shadow, compare
from streamer.synthetic import SyntheticWorld
from tests.conftest import resave_model
from tests.unit.fakes import AppRig, FakeTransactions, RecordingProducer, app_on_fakes
from tests.unit.test_app import StubMessage

SETTINGS = Settings(max_event_bytes=4096)
OUTPUT, SHADOW = SETTINGS.output_topic, SETTINGS.shadow_topic


class Challenger:
    """A challenger with fixed scores per call (or failing on the `fail_on`-th call)."""

    def __init__(self, score: float = 0.9, fail_on: int | None = None) -> None:
        self.name, self.version, self.sha256, self.threshold = "challenger", "c1", "c1", 0.5
        self._score, self._fail_on, self.calls = score, fail_on, 0

    def score(self, features: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == self._fail_on:
            raise RuntimeError("challenger blew up")
        return np.full(len(features), self._score)


def _messages(count: int, start: int = 0, bad: tuple[int, ...] = ()) -> list[StubMessage]:
    events = list(SyntheticWorld(5).generate(start + count))[start:]
    return [
        StubMessage(
            b"\x00garbage" if start + i in bad else encode_transaction(e.record),
            e.record["card_id"].encode(),
            start + i,
        )
        for i, e in enumerate(events)
    ]


def _decoded(producer: RecordingProducer, topic: str) -> list[dict[str, Any]]:
    return [decode_verdict(p.value or b"") for p in producer.produced if p.topic == topic]


@pytest.fixture
def champion(model_path: Path) -> Scorer:
    return Scorer.from_path(model_path)


def _rig(
    champion: Scorer,
    challenger: Any,
    *,
    metrics: ScorerMetrics | None = None,
    transactions: FakeTransactions | None = None,
    producer: RecordingProducer | None = None,
) -> AppRig:
    return app_on_fakes(
        champion,
        SETTINGS,
        producer,
        metrics=metrics,
        transactions=transactions,
        shadow=Shadow(cast(Scorer, challenger)),
    )


class TestCompare:
    def test_agreement_at_both_thresholds_and_the_differences(self) -> None:
        champion = np.array([0.1, 0.4, 0.6, 0.9])
        challenger = np.array([0.2, 0.7, 0.5, 0.95])
        comparison = compare(champion, challenger, 0.5, 0.65)
        assert comparison.records == 4
        # At 0.5: champion F F T T, challenger F T T T. At 0.65: F F F T vs F T F T.
        # Each at its own: champion F F T T (0.5), challenger F T F T (0.65).
        assert comparison.agreements == {"champion": 3, "challenger": 3, "own": 2}
        assert comparison.differences == pytest.approx([0.1, 0.3, -0.1, 0.05])


class TestShadowInTheLoop:
    def test_challenger_verdicts_go_to_the_shadow_topic_and_verdicts_are_unchanged(
        self, champion: Scorer
    ) -> None:
        metrics = ScorerMetrics("g")
        rig = _rig(champion, Challenger(0.9), metrics=metrics)
        plain = app_on_fakes(champion, SETTINGS)
        messages = _messages(20, bad=(3, 11))
        rig.app.process(messages)
        plain.app.process(messages)
        verdicts, shadows = _decoded(rig.producer, OUTPUT), _decoded(rig.producer, SHADOW)
        without = _decoded(plain.producer, OUTPUT)
        drop = {"scored_at"}
        assert [{k: v for k, v in d.items() if k not in drop} for d in verdicts] == [
            {k: v for k, v in d.items() if k not in drop} for d in without
        ]
        assert len(shadows) == len(verdicts) == 18
        assert [s["transaction_id"] for s in shadows] == [v["transaction_id"] for v in verdicts]
        assert {(s["model_version"], s["score"], s["is_fraud"]) for s in shadows} == {
            ("c1", 0.9, True)
        }
        shadow_records = [p for p in rig.producer.produced if p.topic == SHADOW]
        assert [int(p.headers["streamer.source.offset"]) for p in shadow_records] == [
            i for i in range(20) if i not in (3, 11)
        ]
        flagged = sum(v["is_fraud"] for v in verdicts)
        sample = metrics.registry.get_sample_value
        assert sample("streamer_shadow_records_total") == 18
        assert sample("streamer_shadow_agreements_total", {"threshold": "own"}) == flagged
        assert sample("streamer_shadow_score_difference_bucket", {"le": "+Inf"}) == 18
        assert sample("streamer_shadow_active") == 1

    def test_a_failing_challenger_is_switched_off_once_and_scoring_goes_on(
        self, champion: Scorer
    ) -> None:
        metrics = ScorerMetrics("g")
        challenger = Challenger(fail_on=2)
        rig = _rig(champion, challenger, metrics=metrics)
        with structlog.testing.capture_logs() as logs:
            rig.app.process(_messages(10))
            rig.app.process(_messages(10, start=10))
            rig.app.process(_messages(10, start=20))
        assert len(_decoded(rig.producer, OUTPUT)) == 30
        assert len(_decoded(rig.producer, SHADOW)) == 10
        assert challenger.calls == 2
        failures = [e for e in logs if e["event"].startswith("shadow model failed")]
        assert len(failures) == 1
        assert "challenger blew up" in failures[0]["error"]
        assert metrics.registry.get_sample_value("streamer_shadow_active") == 0

    def test_scores_outside_0_1_switch_the_challenger_off(self, champion: Scorer) -> None:
        rig = _rig(champion, Challenger(float("nan")))
        rig.app.process(_messages(10))
        assert len(_decoded(rig.producer, OUTPUT)) == 10
        assert _decoded(rig.producer, SHADOW) == []

    def test_at_least_once_a_lost_shadow_verdict_is_counted_and_offsets_commit(
        self, champion: Scorer
    ) -> None:
        metrics = ScorerMetrics("g")
        producer = RecordingProducer(refuse={SHADOW})
        rig = _rig(champion, Challenger(), metrics=metrics, producer=producer)
        rig.app.process(_messages(10))
        rig.app._checkpoint.maintain()
        rig.app._checkpoint.maintain()
        assert rig.app.shadow_delivery_failures == 10
        assert metrics.registry.get_sample_value("streamer_shadow_delivery_failures_total") == 10
        assert rig.consumer.committed_offsets == {("transactions", 0): 10}

    def test_exactly_once_shadow_verdicts_are_in_the_transaction(self, champion: Scorer) -> None:
        events: list[tuple[Any, ...]] = []
        transactions = FakeTransactions(events=events)
        producer = RecordingProducer(events=events)
        rig = _rig(champion, Challenger(), transactions=transactions, producer=producer)
        rig.app.process(_messages(4))
        rig.app._checkpoint.maintain()
        produced = [event for event in events if event[0] == "produce"]
        assert events[0] == ("begin",)
        assert produced == [("produce", OUTPUT)] * 4 + [("produce", SHADOW)] * 4 + [
            ("produce", "changelog")
        ] * len(produced[8:])
        assert events[-1][0] == "commit"

    def test_exactly_once_an_undelivered_shadow_verdict_fails_its_transaction(
        self, champion: Scorer
    ) -> None:
        transactions = FakeTransactions()
        producer = RecordingProducer(refuse={SHADOW})
        rig = _rig(champion, Challenger(), transactions=transactions, producer=producer)
        rig.app.process(_messages(10))
        # Like any output of the transaction: refused for good, the scorer stops with nothing
        # committed (the shadow topic must exist and be writable: `streamer topics create`).
        with pytest.raises(DeliveryFailedError, match="Topic authorization failed"):
            rig.app._checkpoint.maintain()
        assert [event[0] for event in transactions.events] == ["begin", "abort"]
        assert transactions.offsets == {}


def test_a_refused_challenger_is_left_out_with_a_log_line(model_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "challenger.skops"
    path.write_bytes(b"not a model")
    with structlog.testing.capture_logs() as logs:
        assert Shadow.load(path) is None
    (refusal,) = [e for e in logs if e["event"].startswith("shadow model refused")]
    assert refusal["setting"] == "STREAMER_SHADOW_MODEL_PATH"


def test_a_real_challenger_scores_the_same_rows(
    model_path: Path, tmp_path: Path, champion: Scorer
) -> None:
    path = tmp_path / "challenger.skops"
    shutil.copy(model_path, tmp_path / "src.skops")
    shutil.copy(card_path_for(model_path), card_path_for(tmp_path / "src.skops"))
    resave_model(tmp_path / "src.skops", path, threshold=0.9, name="fraud-challenger")
    shadow = Shadow.load(path)
    assert shadow is not None
    rig = app_on_fakes(champion, SETTINGS, shadow=shadow)
    rig.app.process(_messages(50))
    verdicts, shadows = _decoded(rig.producer, OUTPUT), _decoded(rig.producer, SHADOW)
    # The same fitted estimator: same scores, the challenger's name and threshold.
    assert [s["score"] for s in shadows] == pytest.approx([v["score"] for v in verdicts])
    assert {(s["model_name"], s["threshold"]) for s in shadows} == {("fraud-challenger", 0.9)}
