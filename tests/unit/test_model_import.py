"""`streamer model import`: each supported family in, each refusal, the --data threshold, and a
batch scored end to end through the pipeline with an imported model."""

from __future__ import annotations

import csv
import json
import os
import pickle
import random
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pytest
import sklearn
import sklearn.base
import skops.io
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

from streamer.cli import EXIT_MODEL_REFUSED, EXIT_USAGE, main
from streamer.errors import ConfigError, DataFileError, ModelRefusedError
from streamer.features import FEATURE_ORDER, build_features
from streamer.model.artifact import (
    CLASSIFIER_TYPES,
    PREPROCESSING_TYPES,
    card_path_for,
    load_model,
)
from streamer.model.importer import SAMPLE_SIZE, import_model, read_labelled
from streamer.model.scorer import Scorer
from streamer.model.train import _max_f1_threshold
from streamer.pipeline import Histories, Pipeline
from streamer.serde import decode_verdict, encode_transaction
from streamer.synthetic import SyntheticWorld

ROWS = 3_000
CATEGORY_COLUMNS = [FEATURE_ORDER.index("channel"), FEATURE_ORDER.index("merchant_category")]
OTHER_COLUMNS = [i for i in range(len(FEATURE_ORDER)) if i not in CATEGORY_COLUMNS]

Labelled = tuple[list[dict[str, Any]], np.ndarray, np.ndarray]


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Fit and predict on one OpenMP thread: the tiny models of these tests run faster so."""
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def labelled() -> Labelled:
    """A few thousand synthetic transactions: records, their feature matrix and 0/1 labels."""
    items = list(SyntheticWorld(3, events_per_day=2_000).generate(ROWS))
    records = [item.record for item in items]
    labels = np.array([item.is_fraud for item in items], dtype=int)
    return records, build_features(records), labels


def _lr_pipeline() -> Any:
    return make_pipeline(SimpleImputer(), StandardScaler(), LogisticRegression(max_iter=300))


def _one_hot_pipeline() -> Any:
    columns = ColumnTransformer(
        [
            (
                "codes",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value=-1),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                CATEGORY_COLUMNS,
            )
        ],
        remainder=make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
    )
    return make_pipeline(columns, LogisticRegression(max_iter=300))


FAMILIES: dict[str, Callable[[], Any]] = {
    "hgb": lambda: HistGradientBoostingClassifier(max_iter=20),
    "random_forest": lambda: RandomForestClassifier(n_estimators=10, max_depth=6, n_jobs=-1),
    "extra_trees": lambda: ExtraTreesClassifier(n_estimators=10, max_depth=6),
    "logistic_pipeline": _lr_pipeline,
    "one_hot_pipeline": _one_hot_pipeline,
}


def _fit(model: Any, labelled: Labelled) -> Any:
    _, features, labels = labelled
    return model.fit(features, labels)


def _dump(model: Any, path: Path) -> Path:
    joblib.dump(model, path)
    return path


def _refused(source: Path, tmp_path: Path, **options: Any) -> str:
    target = tmp_path / "out" / "fraud-model.skops"
    with pytest.raises(ModelRefusedError) as caught:
        import_model(source, target, **({"threshold": 0.5} | options))
    assert not target.parent.exists() or list(target.parent.iterdir()) == []
    return str(caught.value)


def _write_csv(path: Path, records: list[dict[str, Any]], labels: np.ndarray) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*records[0], "is_fraud"])
        writer.writeheader()
        for record, label in zip(records, labels, strict=True):
            writer.writerow(
                {k: "" if v is None else v for k, v in record.items()} | {"is_fraud": int(label)}
            )
    return path


class TestImportFamilies:
    @pytest.mark.parametrize("family", list(FAMILIES))
    def test_imported_model_loads_and_scores_as_fitted(
        self, family: str, labelled: Labelled, tmp_path: Path
    ) -> None:
        """A pickled model of each family loads as `streamer run` loads it, with equal scores."""
        model = _fit(FAMILIES[family](), labelled)
        target = tmp_path / "fraud-model.skops"

        result = import_model(_dump(model, tmp_path / "model.joblib"), target, threshold=0.4)

        loaded = load_model(target)
        features = labelled[1]
        assert loaded.card == result.card
        assert loaded.card.threshold == 0.4
        assert loaded.card.features == list(FEATURE_ORDER)
        assert loaded.card.training["source_format"] == "pickle"
        # Equal up to rounding: a forest fitted with n_jobs=-1 sums its trees in another order
        # once reset to one thread.
        np.testing.assert_allclose(
            loaded.estimator.predict_proba(features), model.predict_proba(features), rtol=1e-12
        )

    def test_card_names_the_model(self, labelled: Labelled, tmp_path: Path) -> None:
        """Name, structure, rule and the sample check are on the card."""
        source = _dump(_fit(_lr_pipeline(), labelled), tmp_path / "model.pkl")

        card = import_model(source, tmp_path / "m.skops", threshold=0.3, name="team-lr").card

        assert card.name == "team-lr"
        assert (
            card.training["model"] == "Pipeline(SimpleImputer, StandardScaler, LogisticRegression)"
        )
        assert card.training["algorithm"] == "sklearn.linear_model._logistic.LogisticRegression"
        assert card.training["threshold_rule"] == "given with --threshold"
        assert card.training["sample_check"]["rows"] == SAMPLE_SIZE
        assert card.metrics == {}

    def test_default_name_is_the_classifier(self, labelled: Labelled, tmp_path: Path) -> None:
        """Without --name the model is called after its classifier."""
        source = _dump(_fit(FAMILIES["extra_trees"](), labelled), tmp_path / "model.pkl")

        card = import_model(source, tmp_path / "m.skops", threshold=0.3).card

        assert card.name == "imported-extratreesclassifier"

    def test_skops_input_is_loaded_without_pickle(self, labelled: Labelled, tmp_path: Path) -> None:
        """A skops file is imported too, and recorded as such."""
        source = tmp_path / "model.skops"
        skops.io.dump(_fit(FAMILIES["hgb"](), labelled), source)

        card = import_model(source, tmp_path / "out.skops", threshold=0.3).card

        assert card.training["source_format"] == "skops"

    def test_forest_is_set_to_predict_on_one_thread(
        self, labelled: Labelled, tmp_path: Path
    ) -> None:
        """n_jobs=-1 from the notebook is reset, and the card says so."""
        source = _dump(_fit(FAMILIES["random_forest"](), labelled), tmp_path / "model.pkl")
        target = tmp_path / "m.skops"

        card = import_model(source, target, threshold=0.3).card

        assert load_model(target).estimator.n_jobs is None
        assert any("n_jobs reset" in change for change in card.training["changes"])

    def test_model_fitted_on_named_columns_is_imported(
        self, labelled: Labelled, tmp_path: Path
    ) -> None:
        """A model fitted on `streamer features` columns by name loads and scores a plain matrix."""
        model = _fit(_lr_pipeline(), labelled)
        # What fitting on a DataFrame of the `streamer features` output records.
        model.steps[0][1].feature_names_in_ = np.array(FEATURE_ORDER, dtype=object)
        target = tmp_path / "m.skops"

        card = import_model(_dump(model, tmp_path / "m.pkl"), target, threshold=0.3).card

        assert getattr(load_model(target).estimator, "feature_names_in_", None) is None
        assert any("feature_names_in_ removed" in change for change in card.training["changes"])

    def test_warns_of_rows_the_model_fails_on(self, labelled: Labelled, tmp_path: Path) -> None:
        """An imputer does not take infinity: imported, with a warning naming those rows."""
        source = _dump(_fit(_lr_pipeline(), labelled), tmp_path / "model.pkl")

        result = import_model(source, tmp_path / "m.skops", threshold=0.3)

        assert len(result.warnings) == 1
        assert "infinite" in result.warnings[0]
        assert result.card.training["warnings"] == result.warnings

    def test_trees_take_every_row_without_warning(self, labelled: Labelled, tmp_path: Path) -> None:
        """HistGradientBoosting takes NaN and infinity: no warning."""
        source = _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "model.pkl")

        assert import_model(source, tmp_path / "m.skops", threshold=0.3).warnings == []


SMALL_CLASSIFIERS: dict[type, Callable[[], Any]] = {
    HistGradientBoostingClassifier: lambda: HistGradientBoostingClassifier(max_iter=5),
    RandomForestClassifier: lambda: RandomForestClassifier(n_estimators=3, max_depth=3),
    ExtraTreesClassifier: lambda: ExtraTreesClassifier(n_estimators=3, max_depth=3),
    LogisticRegression: lambda: LogisticRegression(max_iter=50),
}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
class TestTrustedTypes:
    def test_every_family_is_tried(self) -> None:
        """The tests below cover every supported classifier."""
        assert set(SMALL_CLASSIFIERS) == set(CLASSIFIER_TYPES)

    @pytest.mark.parametrize("family", list(CLASSIFIER_TYPES), ids=lambda cls: cls.__name__)
    def test_classifier_needs_exactly_its_reviewed_types(
        self, family: type, labelled: Labelled
    ) -> None:
        """A fitted model of each family needs exactly the types listed for it: no spare trust."""
        _, features, labels = labelled
        if family is LogisticRegression:  # the one family that needs its NaN imputed
            features = np.nan_to_num(features, posinf=0.0)
        model = SMALL_CLASSIFIERS[family]().fit(features, labels)

        untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model))

        assert set(untrusted) == CLASSIFIER_TYPES[family]

    @pytest.mark.parametrize("step", list(PREPROCESSING_TYPES), ids=lambda cls: cls.__name__)
    def test_preprocessing_needs_exactly_its_reviewed_types(
        self, step: type, labelled: Labelled
    ) -> None:
        """A fitted preprocessing step of each kind needs exactly the types listed for it."""
        _, features, labels = labelled
        if step is ColumnTransformer:
            model = ColumnTransformer(
                [("codes", OneHotEncoder(handle_unknown="ignore"), CATEGORY_COLUMNS)],
                remainder="passthrough",
            )
        else:
            model = step()
        if step not in (SimpleImputer, MissingIndicator, OneHotEncoder, ColumnTransformer):
            features = np.nan_to_num(features, posinf=0.0)

        untrusted = skops.io.get_untrusted_types(data=skops.io.dumps(model.fit(features, labels)))

        assert set(untrusted) == PREPROCESSING_TYPES[step]


class TestImportRefusals:
    def test_needs_a_threshold_or_data(self, labelled: Labelled, tmp_path: Path) -> None:
        """Neither --threshold nor --data: a usage error, nothing loaded or written."""
        with pytest.raises(ConfigError, match="--threshold X"):
            import_model(tmp_path / "absent.pkl", tmp_path / "m.skops")

    @pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
    def test_threshold_outside_unit_interval(self, tmp_path: Path, threshold: float) -> None:
        """A threshold outside [0, 1] is a usage error."""
        with pytest.raises(ConfigError, match="between 0 and 1"):
            import_model(tmp_path / "absent.pkl", tmp_path / "m.skops", threshold=threshold)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist is a usage error naming it."""
        with pytest.raises(ConfigError, match=r"absent\.pkl"):
            import_model(tmp_path / "absent.pkl", tmp_path / "m.skops", threshold=0.5)

    def test_not_a_model_file(self, tmp_path: Path) -> None:
        """A file that is neither skops nor pickle is a usage error."""
        source = tmp_path / "notes.txt"
        source.write_text("hello")

        with pytest.raises(ConfigError, match="not a skops, pickle or joblib file"):
            import_model(source, tmp_path / "m.skops", threshold=0.5)

    @pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
    def test_classifier_without_imputer(self, labelled: Labelled, tmp_path: Path) -> None:
        """A LogisticRegression fitted without NaN fails on the real matrix: put an imputer."""
        _, features, labels = labelled
        model = LogisticRegression().fit(np.nan_to_num(features, posinf=0), labels)

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert "Input X contains NaN" in message
        assert "SimpleImputer" in message

    def test_other_feature_count(self, labelled: Labelled, tmp_path: Path) -> None:
        """A model over fewer columns is refused, pointing at `streamer features`."""
        _, features, labels = labelled
        model = HistGradientBoostingClassifier(max_iter=5).fit(features[:, :-1], labels)

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert f"fitted on {len(FEATURE_ORDER) - 1} features" in message
        assert "streamer features" in message

    def test_other_feature_names(self, labelled: Labelled, tmp_path: Path) -> None:
        """Columns in another order are refused, naming the first out of place."""
        model = _fit(FAMILIES["hgb"](), labelled)
        model.feature_names_in_ = np.array(FEATURE_ORDER[::-1], dtype=object)

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert "same names in another order" in message

    def test_unsupported_family(self, labelled: Labelled, tmp_path: Path) -> None:
        """A classifier outside the supported families is refused, naming those."""
        model = make_pipeline(SimpleImputer(), KNeighborsClassifier())

        message = _refused(_dump(_fit(model, labelled), tmp_path / "m.pkl"), tmp_path)

        assert "KNeighborsClassifier as its classifier" in message
        assert "HistGradientBoostingClassifier" in message

    def test_custom_function_step(self, labelled: Labelled, tmp_path: Path) -> None:
        """A FunctionTransformer (user code) cannot be loaded safely: refused."""
        model = make_pipeline(
            SimpleImputer(), FunctionTransformer(np.tanh), LogisticRegression(max_iter=300)
        )

        message = _refused(_dump(_fit(model, labelled), tmp_path / "m.pkl"), tmp_path)

        assert "FunctionTransformer preprocessing step" in message

    def test_native_categories(self, labelled: Labelled, tmp_path: Path) -> None:
        """HGB with native categorical features needs functools.partial: refused, with the fix."""
        model = HistGradientBoostingClassifier(max_iter=5, categorical_features=CATEGORY_COLUMNS)
        features = np.nan_to_num(labelled[1], nan=0.0)
        model.fit(features, labelled[2])

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert "categorical_features=None" in message

    def test_labels_other_than_zero_one(self, labelled: Labelled, tmp_path: Path) -> None:
        """Labels "fraud"/"legit" are refused: column 1 must be P(fraud)."""
        _, features, labels = labelled
        model = HistGradientBoostingClassifier(max_iter=5)
        model.fit(features, np.where(labels == 1, "fraud", "legit"))

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert "not [0, 1]" in message

    def test_other_sklearn_version(
        self, labelled: Labelled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A model pickled by another scikit-learn is refused, naming both versions."""
        model = _fit(FAMILIES["hgb"](), labelled)
        with monkeypatch.context() as patch:
            patch.setattr(sklearn.base, "__version__", "1.2.2")
            source = _dump(model, tmp_path / "m.pkl")

        message = _refused(source, tmp_path)

        assert "saved with scikit-learn 1.2.2" in message
        assert f"runs scikit-learn {sklearn.__version__}" in message

    def test_skops_file_with_untrusted_type(self, labelled: Labelled, tmp_path: Path) -> None:
        """A skops input holding a function is refused before it is loaded."""
        model = _fit(FAMILIES["hgb"](), labelled)
        model.hook = os.system
        source = tmp_path / "m.skops"
        skops.io.dump(model, source)

        message = _refused(source, tmp_path)

        assert "not trusted" in message
        assert "posix.system" in message

    def test_attribute_its_family_does_not_need(self, labelled: Labelled, tmp_path: Path) -> None:
        """A pickled LogisticRegression carrying a tree is refused at the skops round trip."""
        model = _fit(_lr_pipeline(), labelled)
        model.extra = _fit(FAMILIES["extra_trees"](), labelled).estimators_[0].tree_

        message = _refused(_dump(model, tmp_path / "m.pkl"), tmp_path)

        assert "does not need: ['sklearn.tree._tree.Tree']" in message

    def test_refusal_keeps_the_existing_artefact(self, labelled: Labelled, tmp_path: Path) -> None:
        """A refused import leaves the model already at the target path untouched."""
        target = tmp_path / "m.skops"
        import_model(
            _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "a.pkl"), target, threshold=0.3
        )
        before = target.read_bytes(), card_path_for(target).read_bytes()
        bad = _dump(LogisticRegression().fit(np.zeros((4, 3)), [0, 1, 0, 1]), tmp_path / "b.pkl")

        with pytest.raises(ModelRefusedError):
            import_model(bad, target, threshold=0.3)

        assert (target.read_bytes(), card_path_for(target).read_bytes()) == before

    def test_pair_refused_at_load_is_not_put_in_place(
        self, labelled: Labelled, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The written pair is loaded as `streamer run` would before it replaces anything."""
        target = tmp_path / "m.skops"
        source = _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "a.pkl")
        import_model(source, target, threshold=0.3)
        before = target.read_bytes(), card_path_for(target).read_bytes()

        def refuse(path: Path) -> None:
            raise ModelRefusedError(f"refused {path.name}")

        monkeypatch.setattr("streamer.model.importer.load_model", refuse)
        with pytest.raises(ModelRefusedError, match=r"refused \.m\.import-"):
            import_model(source, target, threshold=0.5)

        assert (target.read_bytes(), card_path_for(target).read_bytes()) == before
        assert sorted(path.name for path in tmp_path.iterdir()) == [
            "a.pkl",
            "m.card.json",
            "m.skops",
        ]


class TestImportWithData:
    def test_threshold_maximises_f1_on_the_data(self, labelled: Labelled, tmp_path: Path) -> None:
        """The threshold is train's rule on the file; the card carries the file's metrics."""
        records, features, labels = labelled
        model = _fit(FAMILIES["hgb"](), labelled)
        data = _write_csv(tmp_path / "history.csv", records, labels)

        card = import_model(_dump(model, tmp_path / "m.pkl"), tmp_path / "m.skops", data=data).card

        expected, _ = _max_f1_threshold(labels, model.predict_proba(features)[:, 1])
        assert card.threshold == expected
        assert card.training["threshold_rule"].startswith("max_f1_on_validation")
        assert card.training["data"]["rows"] == len(records)
        assert card.training["data"]["frauds"] == int(labels.sum())
        assert 0.0 < card.metrics["f1"] <= 1.0

    def test_rows_are_taken_in_event_time_order(self, labelled: Labelled, tmp_path: Path) -> None:
        """A shuffled file gives the same features: history is built in event-time order."""
        records, _, labels = labelled
        # Records sharing a millisecond have no order but the file's: leave them out.
        times = Counter(record["event_time"] for record in records)
        kept = [i for i, record in enumerate(records) if times[record["event_time"]] == 1]
        shuffled = random.Random(1).sample(kept, len(kept))
        data = _write_csv(tmp_path / "s.csv", [records[i] for i in shuffled], labels[shuffled])

        read = read_labelled(data)

        np.testing.assert_array_equal(read.features, build_features([records[i] for i in kept]))
        np.testing.assert_array_equal(read.labels, labels[kept].astype(bool))

    def test_given_threshold_wins_over_the_data(self, labelled: Labelled, tmp_path: Path) -> None:
        """--threshold with --data: that threshold, metrics from the data."""
        records, _, labels = labelled
        data = _write_csv(tmp_path / "history.csv", records, labels)
        source = _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "m.pkl")

        card = import_model(source, tmp_path / "m.skops", threshold=0.25, data=data).card

        assert card.threshold == 0.25
        assert "roc_auc" in card.metrics

    def test_bad_row_names_row_and_column(self, labelled: Labelled, tmp_path: Path) -> None:
        """An invalid value stops the import with the data row (counted from 1, as `streamer
        train --data` names it) and the field."""
        records, _, labels = labelled
        bad = [dict(r) for r in records[:50]]
        bad[9]["currency"] = "XXX"
        data = _write_csv(tmp_path / "bad.csv", bad, labels[:50])

        with pytest.raises(DataFileError, match=r"row 10 \(validate\): currency: unknown ISO 4217"):
            read_labelled(data)

    def test_label_not_zero_one(self, labelled: Labelled, tmp_path: Path) -> None:
        """A label other than 0/1 names the label column."""
        records, _, labels = labelled
        data = _write_csv(tmp_path / "bad.csv", records[:20], labels[:20])
        data.write_text(data.read_text().replace(",0\n", ",maybe\n", 1))

        with pytest.raises(DataFileError, match="is_fraud: the label must be 0 or 1"):
            read_labelled(data)

    def test_missing_column(self, labelled: Labelled, tmp_path: Path) -> None:
        """A file without a required field names it."""
        records, _, labels = labelled
        data = _write_csv(
            tmp_path / "bad.csv",
            [{k: v for k, v in r.items() if k != "amount"} for r in records[:5]],
            labels[:5],
        )

        with pytest.raises(DataFileError, match="missing column amount"):
            read_labelled(data)

    def test_no_fraud(self, labelled: Labelled, tmp_path: Path) -> None:
        """A file without fraud cannot choose a threshold."""
        records, _, _ = labelled
        data = _write_csv(tmp_path / "legit.csv", records[:20], np.zeros(20, dtype=int))

        with pytest.raises(DataFileError, match="needs both frauds and legitimate rows"):
            read_labelled(data)


class TestCommand:
    def test_import_exits_zero(self, labelled: Labelled, tmp_path: Path, capsys: Any) -> None:
        """`streamer model import PATH --threshold X` writes the pair and says so."""
        source = _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "m.pkl")
        target = tmp_path / "models" / "fraud-model.skops"

        code = main(
            ["model", "import", str(source), "--threshold", "0.35", "--model-path", str(target)]
        )

        assert code == 0
        assert f"wrote {target}" in capsys.readouterr().out
        assert sorted(path.name for path in target.parent.iterdir()) == [
            "fraud-model.card.json",
            "fraud-model.skops",
        ]
        assert json.loads(card_path_for(target).read_text())["threshold"] == 0.35

    def test_refused_model_exits_three(self, labelled: Labelled, tmp_path: Path) -> None:
        """A refused model exits 3, like a model refused by `streamer run`."""
        source = _dump(
            KNeighborsClassifier().fit(np.nan_to_num(labelled[1]), labelled[2]), tmp_path / "m.pkl"
        )

        code = main(
            [
                "model",
                "import",
                str(source),
                "--threshold",
                "0.5",
                "--model-path",
                str(tmp_path / "m.skops"),
            ]
        )

        assert code == EXIT_MODEL_REFUSED

    def test_missing_threshold_exits_two(self, tmp_path: Path) -> None:
        """No --threshold and no --data: usage, exit 2."""
        code = main(
            ["model", "import", str(tmp_path / "m.pkl"), "--model-path", str(tmp_path / "m.skops")]
        )

        assert code == EXIT_USAGE


class TestEndToEnd:
    def test_imported_pipeline_scores_a_batch(self, labelled: Labelled, tmp_path: Path) -> None:
        """An imported LogisticRegression pipeline scores Avro events as in the notebook."""
        records, features, _ = labelled
        model = _fit(_lr_pipeline(), labelled)
        target = tmp_path / "fraud-model.skops"
        card = import_model(_dump(model, tmp_path / "m.joblib"), target, threshold=0.2).card
        pipeline = Pipeline(Scorer.from_path(target), max_event_bytes=64 * 1024)
        batch = records[:500]

        scored = pipeline.process(
            [encode_transaction(r) for r in batch],
            [r["card_id"].encode() for r in batch],
            Histories(),
        )

        verdicts = [decode_verdict(v) for v in scored.verdicts if v is not None]
        expected = model.predict_proba(features[:500])[:, 1]
        assert scored.errors == {}
        assert [v["transaction_id"] for v in verdicts] == [r["transaction_id"] for r in batch]
        np.testing.assert_array_equal([v["score"] for v in verdicts], expected)
        assert {(v["model_name"], v["model_version"]) for v in verdicts} == {
            ("imported-logisticregression", card.version)
        }
        assert [v["is_fraud"] for v in verdicts] == (expected >= 0.2).tolist()


def test_pickle_is_only_read_by_the_import(labelled: Labelled, tmp_path: Path) -> None:
    """The written artefact is skops (a zip), not the pickle that came in."""
    source = _dump(_fit(FAMILIES["hgb"](), labelled), tmp_path / "m.pkl")
    target = tmp_path / "m.skops"

    import_model(source, target, threshold=0.5)

    assert target.read_bytes()[:4] == b"PK\x03\x04"
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(target.read_bytes())
