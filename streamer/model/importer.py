"""Bring your own model: wrap a classifier fitted elsewhere as a verified artefact and card.

`import_model` takes a fitted scikit-learn classifier over the feature contract
(`features.FEATURE_ORDER`, the matrix `streamer features` writes and the scorer builds), checks
it the way `streamer run` will use it, and writes the same skops artefact and model card as
`streamer train`, so `streamer run` loads it through the same `artifact.load_model` checks.

The input file is a skops file, or a pickle or joblib file as a notebook writes it
(`joblib.dump(model, "model.joblib")`). A skops file is loaded with the reviewed types only, as
`streamer run` loads its artefact. **A pickle or joblib file is unpickled, which runs whatever
code the file names**: import only a file you made or trust. This command is the only place
streamer unpickles anything, once, on the user's own request; the artefact it writes is skops,
and `streamer run` never loads a pickle.

Checks, in order (the first that fails refuses the import, naming what to do):
1. the model is a supported family (`artifact.SUPPORTED_MODELS`) and a fitted binary classifier
   over `FEATURE_ORDER` (feature count, column names when it was fitted on named columns,
   classes_ == [0, 1]), pickled with the scikit-learn this process runs;
2. on a sample of the synthetic world's feature matrix (NaN included, as the stream gives),
   predict_proba returns shape (n, 2) with finite values in [0, 1];
3. the skops round trip gives the same scores bit for bit, and holds no type its family does not
   need.
Rows the stream can produce but the sample may lack (every optional column missing, an infinite
ratio) are tried too; a model that fails on them is imported with a warning, since those records
would be dead-lettered at stage `score`.

Two changes are made to the estimator, both recorded on the card: `feature_names_in_` (checked
equal to `FEATURE_ORDER`) is removed, because the scorer passes a plain matrix and scikit-learn
would otherwise warn that it has no column names; and every `n_jobs` is reset to None, because
the scorer predicts small batches on one thread (a forest fitted with n_jobs=-1 would start a
thread pool per batch).

The threshold is `threshold`, or with a labelled `data` file the one that maximises F1 on it (the
rule of `streamer train`), whose metrics then go on the card. `data` is a Parquet, CSV or Avro
file of `schemas/transaction.avsc` fields plus a 0/1 label column, read and checked as `streamer
train --data` reads it (`streamer.files`); its features are built in event-time order, each row
seeing only the rows before it, as in training. It should be data the model was
not fitted on, or the metrics flatter it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import joblib
import numpy as np
import skops.io
from sklearn.exceptions import InconsistentVersionWarning
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from streamer.errors import ConfigError, DataFileError, ModelRefusedError
from streamer.features import FEATURE_ORDER, build_features
from streamer.files import build_file_features, load_rows
from streamer.model.artifact import (
    SUPPORTED_MODELS,
    TRUSTED_TYPES,
    ModelCard,
    UnsupportedModelError,
    card_path_for,
    check_fitted_binary,
    check_supported,
    describe_model,
    load_model,
    save_model,
)
from streamer.model.train import THRESHOLD_RULE, _evaluate, _iso, _max_f1_threshold
from streamer.synthetic import SyntheticWorld

SAMPLE_SIZE: Final = 2_000
"""Transactions of the synthetic world the model is tried on before it is written."""

SAMPLE_SEED: Final = 11

DEFAULT_LABEL_COLUMN: Final = "is_fraud"

_ZIP_MAGIC: Final = b"PK\x03\x04"
"""skops files are zip archives; anything else is tried as pickle / joblib."""

_MAY_BE_MISSING: Final = (
    "amount_to_card_avg",
    "is_foreign",
    "channel",
    "merchant_category",
    "card_amount_mean_1h",
    "card_amount_mean_24h",
    "card_amount_mean_7d",
    "amount_to_card_mean_30d",
    "seconds_since_previous",
)
"""Columns that are NaN for some records (see `features.FEATURE_ORDER`)."""

_MAY_BE_INFINITE: Final = ("amount_to_card_avg", "amount_to_card_mean_30d")
"""Ratios that are inf for a positive amount over a zero (or vanishing) mean."""

_TRUE: Final = frozenset({"1", "true", "t", "yes"})
_FALSE: Final = frozenset({"0", "false", "f", "no"})


@dataclass(frozen=True)
class ImportResult:
    """What `import_model` wrote and what the user should know about it."""

    card: ModelCard
    warnings: list[str]


@dataclass(frozen=True)
class LabelledFeatures:
    """The feature matrix of a labelled file, rows in event-time order, and what it was."""

    features: np.ndarray
    labels: np.ndarray
    summary: dict[str, Any]


def import_model(
    source: Path,
    model_path: Path,
    *,
    threshold: float | None = None,
    data: Path | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    name: str | None = None,
) -> ImportResult:
    """Check the classifier in `source` and write it to `model_path` with its card.

    Raises `ConfigError` (nothing written) without a threshold or data, for a threshold outside
    [0, 1], a missing or unreadable file, or a bad data file; `ModelRefusedError` (nothing
    written) for a model that fails a check of the module docstring.
    """
    if threshold is None and data is None:
        raise ConfigError(
            "give --threshold X (the score at or above which a transaction is fraud), or"
            " --data PATH (a labelled CSV file to choose it on, as `streamer train` does)"
        )
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"--threshold must be between 0 and 1, got {threshold!r}")
    labelled = None if data is None else read_labelled(data, label_column)

    raw = _read_source(source)
    # Predict on one thread, as the scorer does: on a busy machine OpenMP's thread team costs
    # far more than it saves on these few thousand rows.
    with threadpool_limits(limits=1):
        return _import(source, raw, model_path, threshold, labelled, data, name)


def _import(
    source: Path,
    raw: bytes,
    model_path: Path,
    threshold: float | None,
    labelled: LabelledFeatures | None,
    data: Path | None,
    name: str | None,
) -> ImportResult:
    estimator, source_format = _load_source(raw, source)
    where = f"the model in {source}"
    try:
        check_supported(estimator)
        check_fitted_binary(estimator)
    except UnsupportedModelError as exc:
        raise ModelRefusedError(f"{where} {exc}") from None
    changes = _prepare(estimator)

    sample = _sample_features()
    scores = _scores(estimator, sample, where, "a sample of the feature matrix")
    notes = _edge_cases(estimator, sample[0])
    restored = _round_trip(estimator, where)
    if not np.array_equal(_scores(restored, sample, where, "the sample"), scores):
        raise ModelRefusedError(
            f"{where} scores the sample differently once saved as skops and loaded back: it"
            " cannot be served faithfully; please report this with the model's structure"
            f" ({describe_model(estimator)})"
        )

    metrics: dict[str, float] = {}
    rule = "given with --threshold"
    if labelled is not None:
        data_scores = _scores(estimator, labelled.features, where, f"the data of {data}")
        if threshold is None:
            threshold, _ = _max_f1_threshold(labelled.labels, data_scores)
            rule = f"{THRESHOLD_RULE}: maximises F1 on the --data file"
        metrics = _evaluate(labelled.labels, data_scores, threshold)
    if threshold is None:  # import_model refuses this before loading anything
        raise ConfigError("give --threshold X or --data PATH")

    classifier = estimator.steps[-1][1] if type(estimator) is Pipeline else estimator
    card = ModelCard.for_new_model(
        name=name or f"imported-{type(classifier).__name__.lower()}",
        threshold=threshold,
        metrics=metrics,
        training={
            "source": "streamer model import",
            "imported_from": str(source),
            "source_format": source_format,
            "source_sha256": hashlib.sha256(raw).hexdigest(),
            "algorithm": f"{type(classifier).__module__}.{type(classifier).__qualname__}",
            "model": describe_model(estimator),
            "params": _json_safe(classifier.get_params(deep=False)),
            "threshold_rule": rule,
            "data": None if labelled is None else labelled.summary,
            "metrics_on": "the --data file" if labelled is not None else None,
            "sample_check": {
                "data": "streamer.synthetic.SyntheticWorld",
                "seed": SAMPLE_SEED,
                "rows": len(sample),
                "min_score": float(scores.min()),
                "max_score": float(scores.max()),
            },
            "changes": changes,
            "warnings": notes,
        },
    )
    return ImportResult(_save_verified(restored, card, model_path), notes)


def _save_verified(estimator: Any, card: ModelCard, model_path: Path) -> ModelCard:
    """Save beside `model_path`, load it as `streamer run` will, then rename it into place.

    A pair that `load_model` refuses never replaces the artefact already at `model_path`. The
    artefact is renamed first, as `save_model` writes: a scorer racing the rename sees the old
    pair, or a new artefact its old card refuses, never a torn file.
    """
    model_path.parent.mkdir(parents=True, exist_ok=True)
    staged = model_path.with_name(f".{model_path.stem}.import-{os.getpid()}{model_path.suffix}")
    try:
        saved = save_model(estimator, card, staged)
        load_model(staged)
        os.replace(staged, model_path)
        os.replace(card_path_for(staged), card_path_for(model_path))
    finally:
        staged.unlink(missing_ok=True)
        card_path_for(staged).unlink(missing_ok=True)
    return saved


def read_labelled(path: Path, label_column: str = DEFAULT_LABEL_COLUMN) -> LabelledFeatures:
    """The features and labels of a labelled file of transactions, in event-time order.

    Parquet, CSV or Avro, read and checked as `streamer train --data` reads it (`files`): the
    fields of `schemas/transaction.avsc` plus `label_column`, every row validated with the
    stream's rules, history features built by the stream's code. Raises `DataFileError` naming
    the rows, columns and problems, or when the file holds no fraud or no legitimate row.
    """
    rows = load_rows(path, label_column=label_column)
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    built = build_file_features(rows)
    assert rows.labels is not None  # asked for with label_column
    labels = rows.labels[built.order]
    frauds = int(labels.sum())
    if frauds == 0 or frauds == len(labels):
        raise DataFileError(
            f"{path}: {len(labels)} rows, {frauds} labelled fraud in {label_column!r}: choosing"
            " a threshold needs both frauds and legitimate rows"
        )
    times = built.event_times
    return LabelledFeatures(
        features=built.features,
        labels=labels,
        summary={
            "path": str(path),
            "sha256": digest,
            "rows": len(labels),
            "frauds": frauds,
            "fraud_rate": frauds / len(labels),
            "label_column": label_column,
            "time_range": {
                "first_event": _iso(int(times[0])),
                "last_event": _iso(int(times[-1])),
            },
        },
    )


def _read_source(source: Path) -> bytes:
    try:
        return source.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the model file {source}: {exc.strerror or exc}") from None


def _load_source(raw: bytes, source: Path) -> tuple[Any, str]:
    """The estimator in `raw`, and its format ("skops" or "pickle")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InconsistentVersionWarning)
        if raw.startswith(_ZIP_MAGIC):
            estimator, source_format = _load_skops(raw, source), "skops"
        else:
            try:
                # The one unpickling in streamer: the user's own file, on request (see module).
                estimator, source_format = joblib.load(io.BytesIO(raw)), "pickle"
            except Exception as exc:
                raise ConfigError(
                    f"{source} is not a skops, pickle or joblib file of a model"
                    f" ({type(exc).__name__}: {exc})"
                ) from None
    for warning in caught:
        message = warning.message
        if isinstance(message, InconsistentVersionWarning):
            raise ModelRefusedError(
                f"the model in {source} was saved with scikit-learn"
                f" {message.original_sklearn_version}, this streamer runs scikit-learn"
                f" {message.current_sklearn_version}: refit and save it under"
                f" {message.current_sklearn_version} (pip install"
                f" scikit-learn=={message.current_sklearn_version} in the notebook), or install"
                f" scikit-learn=={message.original_sklearn_version} here and import again"
            )
    return estimator, source_format


def _load_skops(raw: bytes, source: Path) -> Any:
    try:
        untrusted = set(skops.io.get_untrusted_types(data=raw))
    except Exception as exc:
        raise ConfigError(
            f"{source} is not a valid skops file ({type(exc).__name__}: {exc})"
        ) from None
    unexpected = sorted(untrusted - TRUSTED_TYPES)
    if unexpected:
        raise ModelRefusedError(
            f"the model in {source} contains types that are not trusted: {unexpected}."
            f" streamer loads {SUPPORTED_MODELS}; custom classes and functions cannot be loaded"
            " safely: refit without them"
        )
    try:
        return skops.io.loads(raw, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelRefusedError(
            f"the model in {source} could not be loaded ({type(exc).__name__}: {exc})"
        ) from None


def _prepare(estimator: Any) -> list[str]:
    """Make the two changes of the module docstring; return what was changed, in words."""
    changes = []
    entry = estimator
    while type(entry) is Pipeline:
        entry = entry.steps[0][1]
    if getattr(entry, "feature_names_in_", None) is not None:
        # check_fitted_binary has compared them with FEATURE_ORDER (the pipeline's are the entry's)
        del entry.feature_names_in_
        changes.append(
            "feature_names_in_ removed after matching FEATURE_ORDER: the scorer passes a matrix"
        )
    changed = sorted(
        key
        for key, value in estimator.get_params().items()
        if key.endswith("n_jobs") and value is not None
    )
    if changed:
        estimator.set_params(**dict.fromkeys(changed))
        changes.append(f"{', '.join(changed)} reset to None: the scorer predicts on one thread")
    return changes


def _sample_features() -> np.ndarray:
    world = SyntheticWorld(SAMPLE_SEED)
    return build_features([item.record for item in world.generate(SAMPLE_SIZE)])


def _scores(estimator: Any, features: np.ndarray, where: str, what: str) -> np.ndarray:
    """P(fraud) per row, or `ModelRefusedError` saying how predict_proba failed on `what`."""
    try:
        probabilities = np.asarray(estimator.predict_proba(features), dtype=np.float64)
    except Exception as exc:
        hint = ""
        if isinstance(exc, ValueError) and "NaN" in str(exc):
            hint = (
                ": the features hold NaN for missing values (see `streamer features`); put a"
                " SimpleImputer before a classifier that cannot take them, in a Pipeline"
            )
        elif isinstance(exc, ValueError) and "column" in str(exc).lower():
            hint = (
                ": the scorer passes a plain matrix in FEATURE_ORDER; select columns by position"
                " (FEATURE_ORDER.index(name)), not by name"
            )
        raise ModelRefusedError(
            f"{where} fails on {what} ({type(exc).__name__}: {_first_line(exc)}){hint}"
        ) from None
    expected = (len(features), 2)
    if probabilities.shape != expected:
        raise ModelRefusedError(
            f"{where} returns predict_proba of shape {probabilities.shape} on {what}, expected"
            f" {expected}"
        )
    scores = probabilities[:, 1]
    bad = ~((scores >= 0.0) & (scores <= 1.0))  # NaN fails both
    if bad.any():
        raise ModelRefusedError(
            f"{where} returns {int(bad.sum())} probabilities outside [0, 1] on {what} (first:"
            f" {scores[bad][0]!r})"
        )
    return np.ascontiguousarray(scores)


def _edge_cases(estimator: Any, template: np.ndarray) -> list[str]:
    """Warnings for records the stream can give that the model fails on."""
    notes = []
    cases = (
        (
            _MAY_BE_MISSING,
            math.nan,
            "a record with every optional column missing (NaN: no card profile, unknown channel"
            " or merchant category, no history)",
        ),
        (
            _MAY_BE_INFINITE,
            math.inf,
            "a record whose amount ratios are infinite (rare: a positive amount after only zero"
            " amounts)",
        ),
    )
    for columns, value, what in cases:
        row = template.copy()
        row[[FEATURE_ORDER.index(name) for name in columns]] = value
        try:
            score = float(estimator.predict_proba(row[np.newaxis, :])[0, 1])
        except Exception as exc:
            notes.append(
                f"the model fails on {what} ({type(exc).__name__}: {_first_line(exc)}); such"
                " records are dead-lettered at stage score"
            )
            continue
        if not 0.0 <= score <= 1.0:
            notes.append(
                f"the model scores {what} as {score!r}; such records are dead-lettered at stage"
                " score"
            )
    return notes


def _first_line(exc: BaseException) -> str:
    """scikit-learn's messages run to a paragraph; the first line says what happened."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else repr(exc)


def _round_trip(estimator: Any, where: str) -> Any:
    """The estimator saved as skops and loaded back with only the types its family needs."""
    data = skops.io.dumps(estimator)
    untrusted = set(skops.io.get_untrusted_types(data=data))
    spare = sorted(untrusted - check_supported(estimator))
    if spare:
        raise ModelRefusedError(
            f"{where} holds types its {describe_model(estimator)} does not need: {spare}"
            " (an attribute set on the model by hand?); remove them and import again"
        )
    return skops.io.loads(data, trusted=sorted(untrusted))


def _json_safe(value: Any) -> Any:
    """Parameters as JSON values: numbers, strings, lists, dicts; anything else by repr."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    return repr(value)
