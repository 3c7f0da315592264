"""The model slot: a new artefact is noticed, verified and warmed off the loop, swapped between
batches; a refused one leaves the running model in place."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import structlog

from streamer.errors import ModelRefusedError
from streamer.metrics import ScorerMetrics
from streamer.model.artifact import card_path_for
from streamer.model.scorer import Scorer
from streamer.model.slot import ModelSlot
from streamer.serde import decode_verdict, encode_transaction
from streamer.settings import Settings
from streamer.synthetic import SyntheticWorld
from tests.conftest import resave_model
from tests.unit.fakes import FakeTransactions, RecordingProducer, app_on_fakes
from tests.unit.test_app import StubMessage


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeScorer:
    """What the slot needs of a scorer: a version, a sha256, a threshold, `log_fields` and
    `score`."""

    def __init__(self, version: str, *, fails: bool = False, score: float = 0.5) -> None:
        self.name, self.version, self.sha256, self.threshold = "m", version, version, 0.5
        self._fails, self._score = fails, score

    def log_fields(self) -> dict[str, str | float]:
        return {"model_name": self.name, "model_version": self.version}

    def score(self, features: np.ndarray) -> np.ndarray:
        if self._fails:
            raise RuntimeError("boom")
        return np.full(len(features), self._score)


class Loader:
    """Stands in for `Scorer.from_path`: the next scorer (or error) per call."""

    def __init__(self, *results: FakeScorer | Exception) -> None:
        self.results = list(results)
        self.calls = 0

    def __call__(self, path: Path, threshold: float | None) -> Scorer:
        self.calls += 1
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return cast(Scorer, result)


def _pair(directory: Path, content: bytes = b"model-1") -> Path:
    path = directory / "fraud-model.skops"
    path.write_bytes(content)
    card_path_for(path).write_bytes(b"{}")
    return path


def _replace_by_rename(path: Path, content: bytes) -> None:
    staged = path.with_name(".staged")
    staged.write_bytes(content)
    os.replace(staged, path)


def _slot(path: Path, loader: Loader, clock: Clock) -> ModelSlot:
    return ModelSlot(
        cast(Scorer, FakeScorer("v1")),
        path,
        check_interval=2.0,
        load=loader,
        warm=lambda: np.zeros((4, 3)),
        clock=clock,
    )


def _turns(slot: ModelSlot, clock: Clock, count: int) -> None:
    """`count` checks, each a check interval apart, letting each load finish."""
    for _ in range(count):
        clock.now += 2.0
        slot.maintain()
        slot.close()  # waits for a load started by this check
        slot.maintain()


class TestWatch:
    def test_unchanged_files_are_not_loaded(self, tmp_path: Path) -> None:
        loader, clock = Loader(), Clock()
        slot = _slot(_pair(tmp_path), loader, clock)
        _turns(slot, clock, 5)
        assert loader.calls == 0
        assert not slot.ready

    def test_a_pair_replaced_by_rename_is_loaded_once_it_is_still(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v2")), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        _replace_by_rename(path, b"model-2")
        _turns(slot, clock, 1)
        assert loader.calls == 0  # seen once: the card may be renamed next
        _replace_by_rename(card_path_for(path), b'{"v": 2}')
        _turns(slot, clock, 1)
        assert loader.calls == 0
        _turns(slot, clock, 1)
        assert loader.calls == 1
        assert slot.ready
        new = slot.swap()
        assert new.version == "v2"
        assert slot.current is new
        assert slot.reloads == 1
        assert not slot.ready
        _turns(slot, clock, 3)
        assert loader.calls == 1

    def test_nothing_is_checked_before_the_interval(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v2")), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        _replace_by_rename(path, b"model-2")
        for _ in range(10):
            clock.now += 0.1
            slot.maintain()
        assert loader.calls == 0

    def test_a_requested_check_loads_at_once(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v2")), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        _replace_by_rename(path, b"model-2")
        slot.request_check()  # what SIGHUP does
        slot.maintain()
        slot.close()
        slot.maintain()
        assert loader.calls == 1
        assert slot.ready

    def test_a_requested_check_of_the_same_model_changes_nothing(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v1")), Clock()
        slot = _slot(_pair(tmp_path), loader, clock)
        slot.request_check()
        _turns(slot, clock, 1)
        assert loader.calls == 1
        assert not slot.ready
        assert slot.refused == 0


class TestRefusal:
    def test_a_refused_model_keeps_the_old_one_and_is_reported_once(self, tmp_path: Path) -> None:
        refusal = ModelRefusedError("sha256 does not match the card")
        loader, clock = Loader(refusal, FakeScorer("v3")), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        old = slot.current
        _replace_by_rename(path, b"corrupt")
        with structlog.testing.capture_logs() as logs:
            _turns(slot, clock, 6)
        assert loader.calls == 1
        assert slot.refused == 1
        assert slot.current is old
        assert not slot.ready
        refusals = [entry for entry in logs if entry["event"].startswith("new model refused")]
        assert len(refusals) == 1
        assert refusals[0]["reason"] == "sha256 does not match the card"
        # The next version of the files is tried.
        _replace_by_rename(path, b"model-3")
        _turns(slot, clock, 2)
        assert loader.calls == 2
        assert slot.swap().version == "v3"

    def test_a_model_that_fails_on_the_sample_batch_is_refused(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v2", fails=True)), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        _replace_by_rename(path, b"model-2")
        _turns(slot, clock, 2)
        assert (loader.calls, slot.refused, slot.ready) == (1, 1, False)

    def test_a_model_with_scores_outside_0_1_is_refused(self, tmp_path: Path) -> None:
        loader, clock = Loader(FakeScorer("v2", score=float("nan"))), Clock()
        path = _pair(tmp_path)
        slot = _slot(path, loader, clock)
        _replace_by_rename(path, b"model-2")
        _turns(slot, clock, 2)
        assert (loader.calls, slot.refused, slot.ready) == (1, 1, False)

    def test_a_real_corrupt_artefact_is_refused_by_verification(
        self, model_path: Path, tmp_path: Path
    ) -> None:
        path = tmp_path / "fraud-model.skops"
        shutil.copy(model_path, path)
        shutil.copy(card_path_for(model_path), card_path_for(path))
        scorer = Scorer.from_path(path)
        clock = Clock()
        slot = ModelSlot(scorer, path, clock=clock)
        _replace_by_rename(path, b"PK\x03\x04 not a model")
        with structlog.testing.capture_logs() as logs:
            _turns(slot, clock, 2)
        assert slot.refused == 1
        assert slot.current is scorer
        (refusal,) = [entry for entry in logs if entry["event"].startswith("new model refused")]
        assert "sha256" in refusal["reason"]


def _messages(count: int, start: int) -> list[StubMessage]:
    events = SyntheticWorld(3).generate(start + count)
    return [
        StubMessage(encode_transaction(e.record), e.record["card_id"].encode(), i)
        for i, e in enumerate(events)
        if i >= start
    ]


def _verdicts(producer: RecordingProducer) -> list[dict[str, Any]]:
    topic = Settings().output_topic
    return [decode_verdict(p.value) for p in producer.produced if p.topic == topic and p.value]


class TestSwapInTheLoop:
    @pytest.fixture
    def models(self, model_path: Path, tmp_path: Path) -> tuple[Scorer, Path, Scorer]:
        path = tmp_path / "fraud-model.skops"
        shutil.copy(model_path, path)
        shutil.copy(card_path_for(model_path), card_path_for(path))
        first = Scorer.from_path(path)
        staged = tmp_path / "next" / "fraud-model.skops"
        resave_model(path, staged, threshold=0.25)
        second = Scorer.from_path(staged)
        assert second.version != first.version
        return first, path, second

    def _ready_slot(self, first: Scorer, path: Path, second: Scorer) -> ModelSlot:
        clock = Clock()
        slot = ModelSlot(first, path, clock=clock)
        os.replace(path.parent / "next" / path.name, path)
        os.replace(card_path_for(path.parent / "next" / path.name), card_path_for(path))
        _turns(slot, clock, 2)
        assert slot.ready
        return slot

    def test_at_least_once_swaps_between_batches(self, models: tuple[Scorer, Path, Scorer]) -> None:
        first, path, second = models
        slot = self._ready_slot(first, path, second)
        metrics = ScorerMetrics("g")
        rig = app_on_fakes(first, Settings(max_event_bytes=4096), metrics=metrics, slot=slot)
        rig.app.process(_messages(5, 0))
        rig.app._reload(slot)
        rig.app.process(_messages(5, 5))
        verdicts = _verdicts(rig.producer)
        versions = [verdict["model_version"] for verdict in verdicts]
        thresholds = [verdict["threshold"] for verdict in verdicts]
        assert versions == [first.version] * 5 + [second.version] * 5
        assert thresholds == [first.threshold] * 5 + [0.25] * 5
        assert rig.app.model_info()["version"] == second.version
        assert metrics.registry.get_sample_value("streamer_model_reloads_total") == 1

    def test_exactly_once_swaps_only_between_transactions(
        self, models: tuple[Scorer, Path, Scorer]
    ) -> None:
        first, path, second = models
        slot = self._ready_slot(first, path, second)
        transactions = FakeTransactions()
        rig = app_on_fakes(
            first, Settings(max_event_bytes=4096), slot=slot, transactions=transactions
        )
        rig.app.process(_messages(5, 0))
        assert transactions.is_open
        rig.app._reload(slot)  # a transaction is open: not now
        assert slot.ready
        rig.app.process(_messages(5, 5))
        rig.app._checkpoint.maintain()  # commits (interval 0)
        assert not transactions.is_open
        rig.app._reload(slot)
        assert not slot.ready
        rig.app.process(_messages(5, 10))
        versions = [verdict["model_version"] for verdict in _verdicts(rig.producer)]
        assert versions == [first.version] * 10 + [second.version] * 5
        assert [event[0] for event in transactions.events] == ["begin", "commit", "begin"]


class TestThreshold:
    def _copy(self, model_path: Path, tmp_path: Path) -> Path:
        path = tmp_path / "fraud-model.skops"
        shutil.copy(model_path, path)
        shutil.copy(card_path_for(model_path), card_path_for(path))
        return path

    def _rewrite_threshold(self, path: Path, threshold: float) -> None:
        card = json.loads(card_path_for(path).read_text())
        card["threshold"] = threshold
        staged = path.with_name(".card.tmp")
        staged.write_text(json.dumps(card))
        os.replace(staged, card_path_for(path))

    def test_a_card_rewritten_with_a_new_threshold_is_swapped_in(
        self, model_path: Path, tmp_path: Path
    ) -> None:
        path = self._copy(model_path, tmp_path)
        old, clock = Scorer.from_path(path), Clock()
        slot = ModelSlot(old, path, clock=clock)
        self._rewrite_threshold(path, 0.42)
        _turns(slot, clock, 2)
        new = slot.swap()
        assert (new.version, new.threshold) == (old.version, 0.42)

    def test_the_threshold_setting_overrides_every_reloaded_card(
        self, model_path: Path, tmp_path: Path
    ) -> None:
        path = self._copy(model_path, tmp_path)
        old, clock = Scorer.from_path(path, threshold=0.2), Clock()
        slot = ModelSlot(old, path, threshold=0.2, clock=clock)
        self._rewrite_threshold(path, 0.42)
        _turns(slot, clock, 2)
        assert not slot.ready  # same model, same threshold: nothing to swap
        assert slot.refused == 0


def test_sighup_asks_the_slot_for_a_check(model_path: Path, tmp_path: Path) -> None:
    loader, clock = Loader(FakeScorer("v1")), Clock()
    slot = _slot(_pair(tmp_path), loader, clock)
    rig = app_on_fakes(Scorer.from_path(model_path), Settings(), slot=slot)
    handlers = {
        sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        rig.app.install_signal_handlers()
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)  # Python runs the handler at the next bytecode boundary
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert not rig.app._stopping
    slot.maintain()  # before the check interval, unchanged files: loaded because asked
    slot.close()
    assert loader.calls == 1
