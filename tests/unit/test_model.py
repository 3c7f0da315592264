"""Model training, the verified artefact (every refusal), and the batch scorer."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import zipfile
from datetime import UTC, datetime, timedelta
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sklearn
import skops.io
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.tree import DecisionTreeClassifier
from structlog.testing import capture_logs
from threadpoolctl import threadpool_info, threadpool_limits

from streamer.errors import ConfigError, ModelRefusedError
from streamer.features import FEATURE_ORDER, HISTORY_FEATURES, build_features
from streamer.model.artifact import (
    CLASSIFIER_TYPES,
    MODEL_MAJOR_VERSION,
    TRUSTED_TYPES,
    ModelCard,
    card_path_for,
    load_model,
    save_model,
)
from streamer.model.scorer import FLAT_TREES_MAX_ROWS, Scorer
from streamer.model.train import (
    HGB_PARAMS,
    MIN_TRAINING_DAYS,
    TEST_DAYS,
    THRESHOLD_RULE,
    TRAINING_DAYS,
    VALIDATION_DAYS,
    WITH_HISTORY,
    _fit,
    split_by_day,
    train_model,
)
from streamer.model.trees import FlatTrees
from streamer.synthetic import DEFAULT_START_MS, SyntheticWorld

TEST_TRAINING_SIZE = 20_000
TEST_SEED = 5
DAY_MS = 86_400_000


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelCard]:
    """A small model trained once per session into a temporary directory (never committed)."""
    model_path = tmp_path_factory.mktemp("model") / "fraud-model.skops"
    card = train_model(model_path, seed=TEST_SEED, size=TEST_TRAINING_SIZE)
    return model_path, card


@pytest.fixture
def model_copy(trained: tuple[Path, ModelCard], tmp_path: Path) -> Path:
    """A private copy of the trained artefact and card, for tests that damage them."""
    source, _ = trained
    target = tmp_path / source.name
    shutil.copyfile(source, target)
    shutil.copyfile(card_path_for(source), card_path_for(target))
    return target


@pytest.fixture(scope="session")
def unseen() -> tuple[np.ndarray, np.ndarray]:
    """Features and labels from a seed the model never saw."""
    items = list(SyntheticWorld(TEST_SEED + 100).generate(20_000))
    features = build_features([item.record for item in items])
    return features, np.array([item.is_fraud for item in items])


def _count_predict_proba(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count HistGradientBoostingClassifier.predict_proba calls: the rows of each, in order."""
    calls: list[int] = []
    original = HistGradientBoostingClassifier.predict_proba

    def counting(self: HistGradientBoostingClassifier, x: np.ndarray) -> Any:
        calls.append(len(x))
        return original(self, x)

    monkeypatch.setattr(HistGradientBoostingClassifier, "predict_proba", counting)
    return calls


def _rewrite_card(model_path: Path, **changes: Any) -> None:
    card_path = card_path_for(model_path)
    card = json.loads(card_path.read_text()) | changes
    card_path.write_text(json.dumps(card))


def _refusal(model_path: Path) -> str:
    with pytest.raises(ModelRefusedError) as caught:
        load_model(model_path)
    return str(caught.value)


class _TouchOnUnpickle:
    """A pickle payload: unpickling it opens (so creates) the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


class TestTrainModel:
    def test_card_names_the_artefact_bytes(self, trained: tuple[Path, ModelCard]) -> None:
        """The card's sha256 is the sha256 of the artefact file."""
        model_path, card = trained

        assert card.sha256 == hashlib.sha256(model_path.read_bytes()).hexdigest()

    def test_card_on_disk_is_the_returned_card(self, trained: tuple[Path, ModelCard]) -> None:
        """The JSON beside the artefact is the card train_model returned."""
        model_path, card = trained

        assert ModelCard.model_validate_json(card_path_for(model_path).read_bytes()) == card

    def test_card_lists_the_feature_order(self, trained: tuple[Path, ModelCard]) -> None:
        """The card records FEATURE_ORDER."""
        assert trained[1].features == list(FEATURE_ORDER)

    def test_version_carries_date_and_sha(self, trained: tuple[Path, ModelCard]) -> None:
        """The version is <MODEL_MAJOR_VERSION>.<yyyymmdd>.<sha256[:8]>."""
        card = trained[1]

        assert re.fullmatch(rf"{MODEL_MAJOR_VERSION}\.\d{{8}}\.{card.sha256[:8]}", card.version)

    def test_keeps_the_trees_up_to_the_best_validation_loss(
        self, trained: tuple[Path, ModelCard]
    ) -> None:
        """The saved model ends at its best early-stopping score, before the trailing trees."""
        model_path, card = trained
        estimator = load_model(model_path).estimator

        assert card.training["iterations"] == estimator.n_iter_
        assert card.training["iterations"] < card.training["early_stopping_at"]
        assert int(np.argmax(estimator.validation_score_)) == estimator.n_iter_

    def test_category_codes_are_plain_columns(self, trained: tuple[Path, ModelCard]) -> None:
        """No column is a native categorical feature: prediction needs no preprocessing step."""
        estimator = load_model(trained[0]).estimator

        assert estimator.is_categorical_ is None

    def test_test_auc_above_floor(self, trained: tuple[Path, ModelCard]) -> None:
        """Held-out ROC AUC and average precision show a useful, not perfect, model."""
        metrics = trained[1].metrics

        assert 0.9 < metrics["roc_auc"] < 0.999
        assert metrics["average_precision"] > 0.3

    def test_threshold_chosen_by_the_recorded_rule(self, trained: tuple[Path, ModelCard]) -> None:
        """The threshold lies strictly inside (0, 1) and the card names its rule."""
        card = trained[1]

        assert 0.0 < card.threshold < 1.0
        assert card.training["threshold_rule"] == THRESHOLD_RULE

    def test_splits_cover_the_data_in_time_order(self, trained: tuple[Path, ModelCard]) -> None:
        """Train, validation and test sizes add up to the events used, about the size asked."""
        training = trained[1].training
        sizes = training["split_sizes"]

        assert list(sizes) == ["train", "validation", "test"]
        assert sum(sizes.values()) == training["events"]
        assert training["events"] == pytest.approx(TEST_TRAINING_SIZE, rel=0.05)

    def test_splits_are_whole_days(self, trained: tuple[Path, ModelCard]) -> None:
        """Each split's events run from just after its first UTC midnight to just before its end."""
        splits = trained[1].training["splits"]
        start = datetime.fromtimestamp(DEFAULT_START_MS // 1000, UTC)

        assert [splits[name]["days"] for name in ("train", "validation", "test")] == [
            [0, TRAINING_DAYS - VALIDATION_DAYS - TEST_DAYS - 1],
            [TRAINING_DAYS - VALIDATION_DAYS - TEST_DAYS, TRAINING_DAYS - TEST_DAYS - 1],
            [TRAINING_DAYS - TEST_DAYS, TRAINING_DAYS - 1],
        ]
        for split in splits.values():
            first_day = start + timedelta(days=split["days"][0])
            end_of_last_day = start + timedelta(days=split["days"][1] + 1)
            first = datetime.fromisoformat(split["first_event"])
            last = datetime.fromisoformat(split["last_event"])
            assert first_day <= first < first_day + timedelta(hours=1)
            assert end_of_last_day - timedelta(hours=1) < last < end_of_last_day
            assert first.tzinfo == UTC

    def test_time_range_spans_the_splits(self, trained: tuple[Path, ModelCard]) -> None:
        """The data's time range runs from train's first event to test's last."""
        training = trained[1].training

        assert training["time_range"] == {
            "first_event": training["splits"]["train"]["first_event"],
            "last_event": training["splits"]["test"]["last_event"],
        }

    def test_every_split_holds_night_hours(self) -> None:
        """Split by day, each split holds every night hour (00:00-05:59 UTC) and fraud."""
        world = SyntheticWorld(TEST_SEED, events_per_day=2_000)
        end_ms = world.start_ms + TRAINING_DAYS * DAY_MS
        items = list(
            takewhile(
                lambda item: item.record["event_time"] < end_ms,
                world.generate(2_000 * (TRAINING_DAYS + 1)),
            )
        )
        times = np.array([item.record["event_time"] for item in items])

        for split in split_by_day(times, world.start_ms, TRAINING_DAYS):
            rows = times[split.rows]
            days = (rows - world.start_ms) // DAY_MS
            assert set(days.tolist()) == set(range(split.first_day, split.last_day + 1))
            assert set(range(6)) <= set((rows // 3_600_000 % 24).tolist())
            assert any(item.is_fraud for item in items[split.rows])

    def test_card_records_both_average_precisions(self, trained: tuple[Path, ModelCard]) -> None:
        """Validation and test AP of the model and of the same fit without history features."""
        card = trained[1]
        names = [
            "validation_average_precision",
            "average_precision",
            "validation_average_precision_without_history",
            "average_precision_without_history",
        ]

        assert all(0.0 < card.metrics[name] <= 1.0 for name in names)
        assert card.training["without_history"]["features"] == [
            name for name in FEATURE_ORDER if name not in HISTORY_FEATURES
        ]

    def test_history_features_help_on_validation(self, trained: tuple[Path, ModelCard]) -> None:
        """On validation, the model with the card's history clearly beats the one without."""
        metrics = trained[1].metrics

        assert metrics["validation_average_precision"] > (
            metrics["validation_average_precision_without_history"] + 0.05
        )

    def test_too_small_size_is_refused(self, tmp_path: Path) -> None:
        """A size too small to split sensibly raises ValueError and writes nothing."""
        with pytest.raises(ValueError, match="size"):
            train_model(tmp_path / "m.skops", size=100)
        assert list(tmp_path.iterdir()) == []

    def test_too_few_days_are_refused(self, tmp_path: Path) -> None:
        """Fewer than MIN_TRAINING_DAYS days raise ValueError and write nothing."""
        with pytest.raises(ValueError, match="days"):
            train_model(tmp_path / "m.skops", size=20_000, days=MIN_TRAINING_DAYS - 1)
        assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def labelled() -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a small synthetic world, in event-time order."""
    events = list(SyntheticWorld(TEST_SEED).generate(TEST_TRAINING_SIZE))
    features = build_features([event.record for event in events])
    return features, np.array([event.is_fraud for event in events])


class TestFitProgress:
    def test_heartbeats_leave_the_fit_as_it_was(
        self, labelled: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """Beating every millisecond, the fit is the plain one: same trees, same predictions."""
        features, labels = labelled
        with capture_logs():
            fitted, stopped_at = _fit(features, labels, model=WITH_HISTORY, interval=0.001)
        # The fit as written before it reported progress.
        with threadpool_limits(limits=1, user_api="openmp"):
            plain = HistGradientBoostingClassifier(**HGB_PARAMS).fit(features, labels)
            best = int(np.argmax(plain.validation_score_))
            assert 0 < best < plain.n_iter_  # the refit is part of what is compared
            assert stopped_at == plain.n_iter_
            plain = HistGradientBoostingClassifier(**(HGB_PARAMS | {"max_iter": best}))
            plain.fit(features, labels)
        assert fitted.n_iter_ == plain.n_iter_
        for ours, theirs in zip(fitted._predictors, plain._predictors, strict=True):
            assert np.array_equal(ours[0].nodes, theirs[0].nodes)
        assert np.array_equal(fitted.predict_proba(features), plain.predict_proba(features))

    def test_each_fit_says_when_it_starts_and_ends(
        self, labelled: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """The early-stopping fit and the refit: design, rows and features, then seconds."""
        features, labels = labelled
        with capture_logs() as logs:
            estimator, stopped_at = _fit(features, labels, model=WITH_HISTORY, interval=3600)
        lines = [entry for entry in logs if entry["event"] in {"fit_started", "fit_ended"}]
        assert [(entry["event"], entry["fit"]) for entry in lines] == [
            ("fit_started", "early stopping"),
            ("fit_ended", "early stopping"),
            ("fit_started", "refit to the best iteration"),
            ("fit_ended", "refit to the best iteration"),
        ]
        assert {entry["model"] for entry in lines} == {WITH_HISTORY}
        started, ended = lines[0], lines[3]
        assert (started["rows"], started["features"]) == (len(labels), len(FEATURE_ORDER))
        assert lines[1]["iterations"] == stopped_at
        assert ended["iterations"] == estimator.n_iter_
        assert lines[2]["max_iter"] == estimator.n_iter_
        assert all(entry["seconds"] >= 0 for entry in (lines[1], ended))
        assert not [entry for entry in logs if entry["event"] == "still_fitting"]


class TestSaveModel:
    def test_card_path_sits_beside_the_artefact(self) -> None:
        """models/fraud-model.skops has its card at models/fraud-model.card.json."""
        assert card_path_for(Path("models/fraud-model.skops")) == Path(
            "models/fraud-model.card.json"
        )

    def test_leaves_no_temporary_files(self, trained: tuple[Path, ModelCard]) -> None:
        """Only the artefact and its card remain in the directory."""
        model_path, _ = trained

        assert sorted(p.name for p in model_path.parent.iterdir()) == [
            "fraud-model.card.json",
            "fraud-model.skops",
        ]

    def test_files_are_readable_by_others(self, trained: tuple[Path, ModelCard]) -> None:
        """Artefact and card are 0644, so a scorer running as another user can read them."""
        model_path, _ = trained

        assert model_path.stat().st_mode & 0o777 == 0o644
        assert card_path_for(model_path).stat().st_mode & 0o777 == 0o644


class TestLoadModel:
    def test_loads_a_verified_model(self, trained: tuple[Path, ModelCard]) -> None:
        """A freshly trained pair loads, with its card and a fitted classifier."""
        model_path, card = trained

        loaded = load_model(model_path)

        assert loaded.card == card
        assert isinstance(loaded.estimator, HistGradientBoostingClassifier)

    def test_refuses_missing_artefact(self, tmp_path: Path) -> None:
        """No artefact file: refused, pointing at `streamer train`."""
        message = _refusal(tmp_path / "fraud-model.skops")

        assert "no model artefact" in message
        assert "streamer train" in message
        assert "streamer model import" in message
        assert "STREAMER_MODEL_PATH" in message

    def test_refuses_missing_card(self, model_copy: Path) -> None:
        """An artefact without its card is refused."""
        card_path_for(model_copy).unlink()

        message = _refusal(model_copy)

        assert "has no model card" in message
        assert "copy it along with the artefact" in message

    def test_refuses_card_that_is_not_json(self, model_copy: Path) -> None:
        """A card that does not parse is refused as invalid."""
        card_path_for(model_copy).write_text("{not json")

        assert "invalid" in _refusal(model_copy)

    def test_refuses_card_missing_a_field(self, model_copy: Path) -> None:
        """A card without its sha256 is refused as invalid, naming the field."""
        card_path = card_path_for(model_copy)
        card = json.loads(card_path.read_text())
        del card["sha256"]
        card_path.write_text(json.dumps(card))

        assert "sha256" in _refusal(model_copy)

    def test_refuses_one_flipped_byte(self, model_copy: Path) -> None:
        """Changing one byte of the artefact fails the sha256 check."""
        data = bytearray(model_copy.read_bytes())
        data[len(data) // 2] ^= 0x01
        model_copy.write_bytes(bytes(data))

        message = _refusal(model_copy)

        assert "sha256" in message
        assert "changed after its card was written" in message

    def test_refuses_other_sklearn_version(self, model_copy: Path) -> None:
        """A model trained with another scikit-learn is refused."""
        _rewrite_card(model_copy, sklearn_version="0.24.2")

        message = _refusal(model_copy)

        assert "scikit-learn 0.24.2" in message
        assert f"runs scikit-learn {sklearn.__version__}" in message
        assert "pip install scikit-learn==0.24.2" in message

    def test_refuses_other_features(self, model_copy: Path) -> None:
        """A card whose features differ from FEATURE_ORDER is refused."""
        _rewrite_card(model_copy, features=list(reversed(FEATURE_ORDER)))

        message = _refusal(model_copy)

        assert "same names in another order" in message
        assert "retrain with `streamer train`" in message
        assert "`streamer features` output" in message

    def test_refuses_missing_feature(self, model_copy: Path) -> None:
        """A card from a version with other features names what is missing and what is new."""
        _rewrite_card(model_copy, features=[*FEATURE_ORDER[:-1], "card_velocity"])

        message = _refusal(model_copy)

        assert f"missing [{FEATURE_ORDER[-1]!r}]" in message
        assert "unknown ['card_velocity']" in message

    def test_refuses_other_format(self, model_copy: Path) -> None:
        """A card naming another artefact format is refused."""
        _rewrite_card(model_copy, artifact_format="pickle")

        message = _refusal(model_copy)

        assert "format 'pickle'" in message
        assert "streamer model import PATH" in message

    def test_refuses_type_outside_trusted_types(
        self, trained: tuple[Path, ModelCard], tmp_path: Path
    ) -> None:
        """An artefact smuggling os.system beside the trees is refused before loading."""
        model_path, card = trained
        estimator = load_model(model_path).estimator
        estimator.hook = os.system
        rogue_path = tmp_path / "fraud-model.skops"
        save_model(estimator, card, rogue_path)

        message = _refusal(rogue_path)

        assert "not trusted" in message
        assert "posix.system" in message
        assert "RandomForestClassifier" in message  # names the supported families

    def test_refuses_unsupported_estimator(
        self, trained: tuple[Path, ModelCard], tmp_path: Path
    ) -> None:
        """A skops file of an estimator skops trusts but streamer does not support is refused."""
        features = np.random.default_rng(0).random((50, len(FEATURE_ORDER)))
        estimator = KNeighborsClassifier().fit(features, np.arange(50) % 2)
        other_path = tmp_path / "fraud-model.skops"
        save_model(estimator, trained[1], other_path)

        message = _refusal(other_path)

        assert "holds a KNeighborsClassifier as its classifier" in message
        assert "LogisticRegression" in message

    def test_refuses_type_its_family_does_not_need(
        self, trained: tuple[Path, ModelCard], tmp_path: Path
    ) -> None:
        """A LogisticRegression carrying a (trusted) forest tree is refused: no spare trust."""
        features = np.random.default_rng(0).random((50, len(FEATURE_ORDER)))
        labels = np.arange(50) % 2
        estimator = LogisticRegression().fit(features, labels)
        estimator.extra = DecisionTreeClassifier().fit(features, labels).tree_
        rogue_path = tmp_path / "fraud-model.skops"
        save_model(estimator, trained[1], rogue_path)

        message = _refusal(rogue_path)

        assert "LogisticRegression does not need" in message
        assert "sklearn.tree._tree.Tree" in message

    def test_refuses_other_feature_names(
        self, trained: tuple[Path, ModelCard], tmp_path: Path
    ) -> None:
        """A model fitted on columns named otherwise than FEATURE_ORDER is refused."""
        features = np.random.default_rng(0).random((50, len(FEATURE_ORDER)))
        estimator = LogisticRegression().fit(features, np.arange(50) % 2)
        estimator.feature_names_in_ = np.array([f"f{i}" for i in range(len(FEATURE_ORDER))])
        other_path = tmp_path / "fraud-model.skops"
        save_model(estimator, trained[1], other_path)

        message = _refusal(other_path)

        assert "fitted on other feature columns" in message
        assert "unknown ['f0'" in message

    def test_refuses_other_classes(self, trained: tuple[Path, ModelCard], tmp_path: Path) -> None:
        """A classifier of labels other than 0/1 is refused, saying column 1 must be fraud."""
        features = np.random.default_rng(0).random((50, len(FEATURE_ORDER)))
        labels = np.where(np.arange(50) % 2 == 0, "legit", "fraud")
        estimator = LogisticRegression().fit(features, labels)
        other_path = tmp_path / "fraud-model.skops"
        save_model(estimator, trained[1], other_path)

        message = _refusal(other_path)

        assert "predicts classes ['fraud', 'legit'], not [0, 1]" in message

    def test_refuses_zip_that_is_not_skops(self, model_copy: Path) -> None:
        """A zip with a matching card but no skops schema is refused as not a skops file."""
        with zipfile.ZipFile(model_copy, "w") as archive:
            archive.writestr("hello.txt", "hello")
        _rewrite_card(model_copy, sha256=hashlib.sha256(model_copy.read_bytes()).hexdigest())

        assert "not a valid skops file" in _refusal(model_copy)

    def test_malicious_pickle_payload_is_live(self, tmp_path: Path) -> None:
        """Control: unpickling the payload really creates the marker file."""
        marker = tmp_path / "pwned"

        pickle.loads(pickle.dumps(_TouchOnUnpickle(marker))).close()

        assert marker.exists()

    def test_refuses_pickle_without_running_it(self, model_copy: Path, tmp_path: Path) -> None:
        """A pickle named fraud-model.skops, with a matching card, is refused and never run."""
        marker = tmp_path / "pwned"
        model_copy.write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
        _rewrite_card(model_copy, sha256=hashlib.sha256(model_copy.read_bytes()).hexdigest())

        message = _refusal(model_copy)

        assert "is a pickle" in message
        assert "streamer model import PATH" in message
        assert not marker.exists()

    def test_trusted_types_are_what_the_artefact_needs(
        self, trained: tuple[Path, ModelCard]
    ) -> None:
        """The HGB family's types are exactly the untrusted-type list of a real artefact."""
        untrusted = skops.io.get_untrusted_types(file=trained[0])

        assert set(untrusted) == CLASSIFIER_TYPES[HistGradientBoostingClassifier]
        assert set(untrusted) <= TRUSTED_TYPES


class TestScorer:
    def test_scores_are_probabilities(
        self, trained: tuple[Path, ModelCard], unseen: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """One float64 score in [0, 1] per row."""
        features, _ = unseen

        scores = Scorer.from_path(trained[0]).score(features[:500])

        assert scores.dtype == np.float64
        assert scores.shape == (500,)
        assert ((scores >= 0.0) & (scores <= 1.0)).all()

    def test_scores_rank_fraud_above_legit(
        self, trained: tuple[Path, ModelCard], unseen: tuple[np.ndarray, np.ndarray]
    ) -> None:
        """On data from an unseen seed, ROC AUC stays above 0.9."""
        features, labels = unseen

        scores = Scorer.from_path(trained[0]).score(features)

        assert roc_auc_score(labels, scores) > 0.9

    def test_scores_with_missing_enrichment(self, trained: tuple[Path, ModelCard]) -> None:
        """NaN features (unknown card profile, unknown category) still give a score in [0, 1]."""
        row = np.zeros((1, len(FEATURE_ORDER)))
        row[0, FEATURE_ORDER.index("amount_to_card_avg")] = np.nan
        row[0, FEATURE_ORDER.index("is_foreign")] = np.nan
        row[0, FEATURE_ORDER.index("merchant_category")] = np.nan

        score = Scorer.from_path(trained[0]).score(row)[0]

        assert 0.0 <= score <= 1.0

    def test_one_predict_proba_call_per_batch(
        self,
        trained: tuple[Path, ModelCard],
        unseen: tuple[np.ndarray, np.ndarray],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A batch is scored with a single predict_proba call."""
        scorer = Scorer.from_path(trained[0])
        calls = _count_predict_proba(monkeypatch)
        scorer.score(unseen[0][:500])

        assert calls == [500]

    def test_prediction_runs_on_one_openmp_thread(
        self,
        trained: tuple[Path, ModelCard],
        unseen: tuple[np.ndarray, np.ndarray],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While predict_proba runs, every OpenMP pool is limited to one thread."""
        scorer = Scorer.from_path(trained[0])
        seen: list[int] = []
        original = HistGradientBoostingClassifier.predict_proba

        def spying(self: HistGradientBoostingClassifier, x: np.ndarray) -> Any:
            seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "openmp")
            return original(self, x)

        monkeypatch.setattr(HistGradientBoostingClassifier, "predict_proba", spying)
        scorer.score(unseen[0][: FLAT_TREES_MAX_ROWS + 10])

        assert seen
        assert set(seen) == {1}

    def test_small_batches_score_as_predict_proba_bit_for_bit(
        self,
        trained: tuple[Path, ModelCard],
        unseen: tuple[np.ndarray, np.ndarray],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Up to FLAT_TREES_MAX_ROWS rows are scored without predict_proba, to the same bits
        (missing values included)."""
        scorer = Scorer.from_path(trained[0])
        estimator = load_model(trained[0]).estimator
        features = unseen[0].copy()
        features[::7, FEATURE_ORDER.index("amount_to_card_mean_30d")] = np.nan
        features[::5, FEATURE_ORDER.index("seconds_since_previous")] = np.nan
        batches = [
            features[start : start + rows]
            for start in range(0, 4_000, FLAT_TREES_MAX_ROWS)
            for rows in (1, 7, FLAT_TREES_MAX_ROWS)
        ]
        expected = [estimator.predict_proba(batch)[:, 1] for batch in batches]
        calls = _count_predict_proba(monkeypatch)
        for batch, wanted in zip(batches, expected, strict=True):
            scores = scorer.score(batch)
            assert scores.view(np.int64).tolist() == wanted.view(np.int64).tolist()
        assert calls == []

    def test_flat_trees_send_missing_and_infinite_values_where_scikit_learn_does(self) -> None:
        """Splits of missing against every value (threshold +inf, missing right), missing values
        elsewhere, and +inf and -inf in the rows: the same bits as predict_proba."""
        rng = np.random.default_rng(3)
        x = rng.normal(size=(2_000, 3))
        y = (x[:, 0] > 0.3).astype(int)
        x[y == 1, 1] = np.nan  # only a missing value says 1: a split of missing against the rest
        x[rng.random(2_000) < 0.05, 2] = np.nan
        model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
        nodes = np.concatenate([tree[0].nodes for tree in model._predictors])
        missing_alone = (
            (nodes["is_leaf"] == 0)
            & (nodes["num_threshold"] == np.inf)
            & (nodes["missing_go_to_left"] == 0)
        )
        assert missing_alone.any(), "the model these rows test has such splits"
        flat = FlatTrees.of(model)
        assert flat is not None
        rows = rng.normal(size=(500, 3))
        rows[::3, 1] = np.nan
        rows[::4, 2] = np.nan
        rows[::5, 0] = np.inf
        rows[::6, 1] = np.inf
        rows[::7, 2] = -np.inf
        for batch in (rows, rows[:1], rows[3:4], rows[:64]):
            expected = model.predict_proba(batch)[:, 1]
            assert flat.score(batch).view(np.int64).tolist() == expected.view(np.int64).tolist()

    def test_flat_trees_decline_what_they_do_not_cover(self) -> None:
        """Several classes, categorical splits or another estimator: None (predict_proba)."""
        rng = np.random.default_rng(0)
        x = rng.normal(size=(300, 3))
        x[:, 2] = rng.integers(0, 4, size=300)
        binary = (x[:, 0] > 0).astype(int)
        multi = rng.integers(0, 3, size=300)
        fitted = HistGradientBoostingClassifier(max_iter=5).fit(x, binary)
        assert FlatTrees.of(fitted) is not None
        assert FlatTrees.of(HistGradientBoostingClassifier(max_iter=5).fit(x, multi)) is None
        categorical = HistGradientBoostingClassifier(max_iter=5, categorical_features=[2])
        assert FlatTrees.of(categorical.fit(x, binary)) is None
        assert FlatTrees.of(LogisticRegression().fit(x, binary)) is None

    def test_empty_batch_gives_no_scores(self, trained: tuple[Path, ModelCard]) -> None:
        """A (0, n) matrix gives an empty score array."""
        scores = Scorer.from_path(trained[0]).score(np.empty((0, len(FEATURE_ORDER))))

        assert scores.shape == (0,)

    def test_wrong_column_count_is_refused(self, trained: tuple[Path, ModelCard]) -> None:
        """A matrix with the wrong number of columns raises ValueError."""
        with pytest.raises(ValueError, match="shape"):
            Scorer.from_path(trained[0]).score(np.zeros((3, len(FEATURE_ORDER) - 1)))

    def test_default_threshold_comes_from_the_card(self, trained: tuple[Path, ModelCard]) -> None:
        """Without an override the card's threshold is used."""
        model_path, card = trained

        assert Scorer.from_path(model_path).threshold == card.threshold

    def test_threshold_override(self, trained: tuple[Path, ModelCard]) -> None:
        """An explicit threshold replaces the card's."""
        assert Scorer.from_path(trained[0], threshold=0.9).threshold == 0.9

    @pytest.mark.parametrize("threshold", [-0.01, 1.01, float("nan")])
    def test_threshold_outside_unit_interval_is_refused(
        self, trained: tuple[Path, ModelCard], threshold: float
    ) -> None:
        """A threshold outside [0, 1] raises ConfigError."""
        with pytest.raises(ConfigError, match="threshold"):
            Scorer.from_path(trained[0], threshold=threshold)

    def test_exposes_the_card_identity(self, trained: tuple[Path, ModelCard]) -> None:
        """name, version, sha256 and card come from the verified card."""
        model_path, card = trained

        scorer = Scorer.from_path(model_path)

        assert (scorer.name, scorer.version, scorer.sha256, scorer.card) == (
            card.name,
            card.version,
            card.sha256,
            card,
        )

    def test_refuses_a_damaged_artefact(self, model_copy: Path) -> None:
        """from_path refuses what load_model refuses."""
        model_copy.write_bytes(b"not a model")

        with pytest.raises(ModelRefusedError):
            Scorer.from_path(model_copy)
