"""Train the fraud model on the synthetic world and save it with its model card.

The labelled set is the first `days` whole UTC days of `SyntheticWorld(seed)` running at
`size / days` events a day, so about `size` events (the card records the exact count). Its
features are built once over the whole set in event-time order, so every history feature of a
transaction comes from that card's earlier transactions only, as in the stream.

The split is by whole days of event time, as production data would be split: with day d holding
the events in [start + d days, start + d + 1 days) of the world's clock (which starts at a UTC
midnight), the last `TEST_DAYS` days are the test split, the `VALIDATION_DAYS` days before them
the validation split, and every earlier day trains (days 0-5, 6-7 and 8-9 by default). Whole
days give every split its nights, when fraud is likeliest, and the same daily rhythm. Training
never sees the future; history features of the later splits do read earlier days, as a scorer
running for a week would. Training keeps day 0, when every card's history starts empty: leaving
the first day or two out as a warm-up did not raise validation average precision when tried, and
a scorer starts with empty histories too.

`train_from_file` trains on a labelled history instead (`streamer train --data`): a Parquet,
CSV or Avro file with the fields of `schemas/transaction.avsc` and a 0/1 label column, read and
validated row by row with the stream's rules (`streamer.files`), its features built in
event-time order by the stream's code. Spanning at least `MIN_TRAINING_DAYS` UTC days, it is
split by whole UTC days as above, day 0 being the UTC day of its first event; a shorter history
is split by time fractions: in event-time order, the first `FRACTION_SPLIT[0]` of the rows
train, up to `FRACTION_SPLIT[1]` validate, the rest test, each cut moved back to the first row
of its millisecond so that no millisecond is split. The card records the file's sha256, rows,
fraud rate, time range and the split boundaries.

Design choices are compared on validation; the test split is scored once, at the end. One
comparison is made on every run and recorded on the card: the same estimator fit on the same
rows with the history features left out (`features.FEATURE_ORDER` minus
`features.HISTORY_FEATURES`, by name), so the card says what the card's history is worth.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import numpy as np
import structlog
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)
from threadpoolctl import threadpool_limits

from streamer.errors import DataFileError
from streamer.features import (
    FEATURE_ORDER,
    HISTORY_FEATURES,
    build_features,
)
from streamer.files import Progress, build_file_features, load_rows
from streamer.model.artifact import ModelCard, save_model
from streamer.progress import DEFAULT_INTERVAL_SECONDS, Heartbeat
from streamer.synthetic import DEFAULT_EVENTS_PER_DAY, LabelledTransaction, SyntheticWorld

TRAINING_DAYS: Final = 10
"""Simulated days of data by default: six train, two validate, two test."""

VALIDATION_DAYS: Final = 2
TEST_DAYS: Final = 2
"""The validation and test splits: whole days, the test split the latest."""

MIN_TRAINING_DAYS: Final = 7
"""Fewer days leave the training split under three days: too few for a card's weekly habits."""

DEFAULT_TRAINING_SIZE: Final = TRAINING_DAYS * DEFAULT_EVENTS_PER_DAY
"""`TRAINING_DAYS` days of the default world, the one `streamer produce` streams.

At `synthetic.DEFAULT_EVENTS_PER_DAY` events a day the default model learns from the same
cards-to-events ratio, and so the same per-card history, as the stream it will score."""

DEFAULT_SEED: Final = 7
MODEL_NAME: Final = "fraud-hgb"

WITH_HISTORY: Final = "with history"
"""The design of the model saved, as the fit progress lines name it."""
WITHOUT_HISTORY: Final = "without history"
"""The same estimator without the history features, fitted on every run for the card's
comparison, as the fit progress lines name it."""

MIN_TRAINING_SIZE: Final = 10_000
"""Below this the validation and test splits hold too few frauds to choose or judge anything."""

THRESHOLD_RULE: Final = "max_f1_on_validation"
"""The threshold is the score that maximises F1 on the validation split (flag score >= it)."""

HGB_PARAMS: Final[dict[str, Any]] = {
    "learning_rate": 0.1,
    "max_iter": 500,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    # Early stopping on a random 10% of the training split: max_iter is only a ceiling. The saved
    # model keeps the trees up to the best validation loss (see `_fit`), not the trailing ones.
    "early_stopping": True,
    "validation_fraction": 0.1,
    "n_iter_no_change": 20,
    "random_state": 0,
}
"""HistGradientBoostingClassifier parameters.

The category columns (`features.CATEGORICAL_FEATURES`) go in as ordered codes, not as the
estimator's native categorical features: the trees isolate any code with two splits, the metrics
on the card are the same, and prediction skips the per-call categorical preprocessing that cost
more than the trees on a poll batch of a few hundred rows (see README "Performance").
"""

_MS_PER_DAY: Final = 86_400_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_GENERATION_HEADROOM: Final = 2
"""Events asked of the world per event expected: `days` days end long before this runs out."""

log = structlog.get_logger(__name__)


MIN_DATA_ROWS: Final = 1_000
"""`train_from_file`: fewer valid rows than this is refused (the splits would be too thin)."""

MIN_TRAINING_FRAUDS: Final = 10
"""`train_from_file`: frauds the training split needs at least (early stopping holds out 10%
of them); the validation and test splits need at least one fraud and one legitimate row."""

FRACTION_SPLIT: Final = (0.6, 0.8)
"""`train_from_file` on fewer than `MIN_TRAINING_DAYS` days: where validation and test start,
as fractions of the rows in event-time order."""


@dataclass(frozen=True, slots=True)
class DaySplit:
    """One split of the data: the whole days first_day..last_day (inclusive), as its `rows`."""

    name: str
    first_day: int
    last_day: int
    rows: slice


@dataclass(frozen=True, slots=True)
class TimeSplit:
    """One split of the data by a time fraction: the rows `rows` in event-time order."""

    name: str
    rows: slice


Split = DaySplit | TimeSplit


def train_model(
    model_path: Path,
    *,
    seed: int = DEFAULT_SEED,
    size: int = DEFAULT_TRAINING_SIZE,
    days: int = TRAINING_DAYS,
    progress_interval: float = DEFAULT_INTERVAL_SECONDS,
) -> ModelCard:
    """Train on `days` days of the synthetic world of `seed` (about `size` transactions).

    Saves the model to `model_path` with its card and returns the card. The threshold follows
    `THRESHOLD_RULE`; the card's metrics are on the test split (roc_auc, average_precision,
    precision, recall and f1 at the threshold, fraud_rate), plus validation_f1,
    validation_average_precision, and the two average precisions of the model without history
    features (average_precision_without_history, validation_average_precision_without_history).
    Raises `ValueError` when `size` is below `MIN_TRAINING_SIZE`, `days` below
    `MIN_TRAINING_DAYS`, or a split holds no fraud; nothing is written then.
    `progress_interval`: seconds between the "still fitting" lines of a fit, off a terminal.
    """
    if size < MIN_TRAINING_SIZE:
        raise ValueError(f"size must be at least {MIN_TRAINING_SIZE}, got {size}")
    if days < MIN_TRAINING_DAYS:
        raise ValueError(f"days must be at least {MIN_TRAINING_DAYS}, got {days}")
    started = time.perf_counter()
    log.info("training_started", seed=seed, size=size, days=days, model_path=str(model_path))

    world = SyntheticWorld(seed, events_per_day=size / days)
    labelled = _whole_days(world, days, size)
    count = len(labelled)
    event_times = np.fromiter(
        (item.record["event_time"] for item in labelled), dtype=np.int64, count=count
    )
    labels = np.fromiter((item.is_fraud for item in labelled), dtype=bool, count=count)
    # One pass in event-time order: each row's history features see only earlier rows.
    features = build_features([item.record for item in labelled])
    del labelled
    log.info(
        "training_set_built",
        events=count,
        frauds=int(labels.sum()),
        seconds=round(time.perf_counter() - started, 2),
        next="fitting the model and its baseline without history (the longest step)",
    )
    splits = split_by_day(event_times, world.start_ms, days)
    for split in splits:
        if not labels[split.rows].any():
            raise ValueError(f"the {split.name} split holds no fraud; use a larger size")
    data = {
        "data": "streamer.synthetic.SyntheticWorld",
        "seed": seed,
        "size": size,
        "days": days,
        "events_per_day": size / days,
        "cards": world.n_cards,
    }
    rule = (
        f"by whole UTC days of event time, day d = [start + d days, start + d + 1 days)"
        f" from start {_iso(world.start_ms)}: test the last {TEST_DAYS} days,"
        f" validation the {VALIDATION_DAYS} before, train every earlier day"
    )
    return _fit_and_save(
        model_path,
        features,
        labels,
        event_times,
        splits,
        data,
        rule,
        _day_boundaries(splits, world.start_ms),
        started,
        progress_interval,
    )


def train_from_file(
    model_path: Path,
    data_path: Path,
    *,
    label_column: str = "is_fraud",
    progress_interval: float = DEFAULT_INTERVAL_SECONDS,
) -> ModelCard:
    """Train on the labelled history in `data_path` (see the module docstring); save and return.

    Raises `DataFileError` naming the row, column and problem for a bad row, and for a file
    that cannot train a model (a missing column, no fraud at all, fewer rows than the splits
    need); nothing is written then. `progress_interval`: seconds between progress lines while
    the features are built and while a fit runs, off a terminal.
    """
    started = time.perf_counter()
    log.info("training_started", data=str(data_path), label_column=label_column)
    rows = load_rows(data_path, label_column=label_column)
    if len(rows) < MIN_DATA_ROWS:
        raise DataFileError(
            f"{data_path}: {len(rows):,} rows; training needs at least {MIN_DATA_ROWS:,}"
        )
    with data_path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256").hexdigest()
    built = build_file_features(
        rows, progress=Progress("features", len(rows), interval=progress_interval)
    )
    assert rows.labels is not None  # asked for with label_column
    labels = rows.labels[built.order]
    event_times = built.event_times
    frauds = int(labels.sum())
    if frauds == 0:
        raise DataFileError(f"{data_path}: no row has {label_column} = 1; training needs frauds")
    if frauds == len(labels):
        raise DataFileError(f"{data_path}: every row has {label_column} = 1")
    first_day = int(event_times[0]) // _MS_PER_DAY
    days = int(event_times[-1]) // _MS_PER_DAY - first_day + 1
    splits: tuple[Split, ...]
    if days >= MIN_TRAINING_DAYS:
        start_ms = first_day * _MS_PER_DAY
        splits = split_by_day(event_times, start_ms, days)
        boundaries = _day_boundaries(splits, start_ms)
        rule = (
            f"by whole UTC days of event time, day 0 the UTC day of the first event"
            f" ({_iso(start_ms)}): test the last {TEST_DAYS} days, validation the"
            f" {VALIDATION_DAYS} before, train every earlier day"
        )
    else:
        splits = split_by_fraction(event_times)
        boundaries = {
            split.name: _iso(int(event_times[split.rows.start]))
            for split in splits[1:]
            if split.rows.start < len(event_times)
        }
        rule = (
            f"by time fractions ({days} UTC days of data, fewer than {MIN_TRAINING_DAYS}): in"
            f" event-time order the first {FRACTION_SPLIT[0]:.0%} of rows train, up to"
            f" {FRACTION_SPLIT[1]:.0%} validate, the rest test; no millisecond is split"
        )
    for split in splits:
        split_labels = labels[split.rows]
        split_frauds = int(split_labels.sum())
        needed = MIN_TRAINING_FRAUDS if split.name == "train" else 1
        if split_frauds < needed or split_frauds == len(split_labels):
            raise DataFileError(
                f"{data_path}: the {split.name} split ({rule}) holds {len(split_labels):,} rows"
                f" of which {split_frauds:,} frauds; it needs at least {needed} fraud"
                f"{'s' if needed > 1 else ''} and a legitimate row: fewer rows than the splits"
                " need"
            )
    data = {
        "data": str(data_path),
        "sha256": digest,
        "label_column": label_column,
        "rows": len(labels),
        "days": days,
    }
    return _fit_and_save(
        model_path,
        built.features,
        labels,
        event_times,
        splits,
        data,
        rule,
        boundaries,
        started,
        progress_interval,
    )


def split_by_fraction(event_times: np.ndarray) -> tuple[TimeSplit, ...]:
    """Train, validation and test by `FRACTION_SPLIT` of the rows (non-decreasing times).

    A cut that falls inside a millisecond moves back to that millisecond's first row.
    """
    count = len(event_times)
    cuts = [int(count * fraction) for fraction in FRACTION_SPLIT]
    validation_row, test_row = (
        int(np.searchsorted(event_times, event_times[cut], side="left")) if cut < count else count
        for cut in cuts
    )
    return (
        TimeSplit("train", slice(0, validation_row)),
        TimeSplit("validation", slice(validation_row, test_row)),
        TimeSplit("test", slice(test_row, count)),
    )


def _day_boundaries(splits: tuple[DaySplit, ...], start_ms: int) -> dict[str, str]:
    """When validation and test start: the UTC midnight of their first day."""
    return {split.name: _iso(start_ms + split.first_day * _MS_PER_DAY) for split in splits[1:]}


def _fit_and_save(
    model_path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    event_times: np.ndarray,
    splits: tuple[Split, ...],
    data: dict[str, Any],
    rule: str,
    boundaries: dict[str, str],
    started: float,
    progress_interval: float,
) -> ModelCard:
    """Fit on the train split, choose the threshold on validation, evaluate on test, save."""
    count = len(labels)
    train, validation, test = (split.rows for split in splits)
    fit_started = time.perf_counter()
    estimator, stopped_at = _fit(
        features[train], labels[train], model=WITH_HISTORY, interval=progress_interval
    )
    fit_seconds = time.perf_counter() - fit_started
    log.info(
        "model_fitted",
        iterations=int(estimator.n_iter_),
        early_stopping_at=stopped_at,
        fit_seconds=round(fit_seconds, 2),
    )

    validation_scores = estimator.predict_proba(features[validation])[:, 1]
    threshold, validation_f1 = _max_f1_threshold(labels[validation], validation_scores)
    metrics = _evaluate(labels[test], estimator.predict_proba(features[test])[:, 1], threshold)
    metrics["validation_f1"] = validation_f1
    metrics["validation_average_precision"] = float(
        average_precision_score(labels[validation], validation_scores)
    )

    # The same fit without the card's history: what the history features add, on the same rows.
    plain_features = [name for name in FEATURE_ORDER if name not in HISTORY_FEATURES]
    plain = [FEATURE_ORDER.index(name) for name in plain_features]
    plain_estimator, plain_stopped_at = _fit(
        features[train][:, plain], labels[train], model=WITHOUT_HISTORY, interval=progress_interval
    )
    for split_name, rows in (("validation_", validation), ("", test)):
        scores = plain_estimator.predict_proba(features[rows][:, plain])[:, 1]
        metrics[f"{split_name}average_precision_without_history"] = float(
            average_precision_score(labels[rows], scores)
        )
    log.info(
        "history_compared",
        validation_average_precision=round(metrics["validation_average_precision"], 4),
        validation_average_precision_without_history=round(
            metrics["validation_average_precision_without_history"], 4
        ),
    )

    card = ModelCard.for_new_model(
        name=MODEL_NAME,
        threshold=threshold,
        metrics=metrics,
        training={
            **data,
            "events": count,
            "fraud_rate": float(labels.mean()),
            "time_range": {
                "first_event": _iso(int(event_times[0])),
                "last_event": _iso(int(event_times[-1])),
            },
            "split": rule,
            "split_boundaries": {f"{name}_from": moment for name, moment in boundaries.items()},
            "splits": {
                split.name: {
                    **(
                        {"days": [split.first_day, split.last_day]}
                        if isinstance(split, DaySplit)
                        else {}
                    ),
                    "first_event": _iso(int(event_times[split.rows][0])),
                    "last_event": _iso(int(event_times[split.rows][-1])),
                    "size": split.rows.stop - split.rows.start,
                    "frauds": int(labels[split.rows].sum()),
                }
                for split in splits
            },
            "split_sizes": {split.name: split.rows.stop - split.rows.start for split in splits},
            "algorithm": "sklearn.ensemble.HistGradientBoostingClassifier",
            "params": HGB_PARAMS,
            "category_encoding": "ordered codes (features.CATEGORICAL_FEATURES)",
            "iterations": int(estimator.n_iter_),
            "early_stopping_at": stopped_at,
            "threshold_rule": THRESHOLD_RULE,
            "fit_seconds": round(fit_seconds, 2),
            "without_history": {
                "features": plain_features,
                "iterations": int(plain_estimator.n_iter_),
                "early_stopping_at": plain_stopped_at,
            },
        },
    )
    saved = save_model(estimator, card, model_path)
    log.info(
        "model_saved",
        model_path=str(model_path),
        name=saved.name,
        version=saved.version,
        threshold=round(saved.threshold, 4),
        seconds=round(time.perf_counter() - started, 2),
        **{name: round(value, 4) for name, value in saved.metrics.items()},
    )
    return saved


def _whole_days(world: SyntheticWorld, days: int, size: int) -> list[LabelledTransaction]:
    """The world's events from its start up to the end of day `days - 1`, in event-time order."""
    end_ms = world.start_ms + days * _MS_PER_DAY
    labelled: list[LabelledTransaction] = []
    for item in world.generate(_GENERATION_HEADROOM * size):
        if item.record["event_time"] >= end_ms:
            return labelled
        labelled.append(item)
    # Only a world far slower than size / days a day gets here.
    raise ValueError(f"{_GENERATION_HEADROOM * size} events did not fill {days} days")


def split_by_day(event_times: np.ndarray, start_ms: int, days: int) -> tuple[DaySplit, ...]:
    """Train, validation and test: the rows of whole days, by the rule in the module docstring.

    `event_times` (ms) must be non-decreasing and within `days` days from `start_ms`; day d is
    [start_ms + d days, start_ms + d + 1 days). A split's rows may be empty, never out of order.
    """
    validation_day = days - TEST_DAYS - VALIDATION_DAYS
    test_day = days - TEST_DAYS
    day_starts = start_ms + np.array([validation_day, test_day], dtype=np.int64) * _MS_PER_DAY
    validation_row, test_row = (int(i) for i in np.searchsorted(event_times, day_starts))
    return (
        DaySplit("train", 0, validation_day - 1, slice(0, validation_row)),
        DaySplit("validation", validation_day, test_day - 1, slice(validation_row, test_row)),
        DaySplit("test", test_day, days - 1, slice(test_row, len(event_times))),
    )


def _iso(millis: int) -> str:
    """Milliseconds since the epoch as ISO 8601 UTC, e.g. 2026-01-01T00:00:00.000+00:00."""
    # Integer arithmetic: a float of seconds can round 0.123 s down to 0.122.
    moment = _EPOCH + timedelta(milliseconds=millis)
    return moment.isoformat(timespec="milliseconds")


def _fit(
    features: np.ndarray, labels: np.ndarray, *, model: str, interval: float
) -> tuple[HistGradientBoostingClassifier, int]:
    """Fit with early stopping; keep the trees up to the best validation loss.

    Early stopping ends `n_iter_no_change` iterations after the best one and keeps those trailing
    trees, which cost prediction time and did not help. A second fit capped at the best iteration
    grows exactly the same first trees (same data, same `random_state`, same validation split).
    Returns the estimator and the iteration at which the first fit stopped.

    Fits on one OpenMP thread. On a 2-core machine shared with a broker, tests or a bench, the
    threads of a parallel fit wait for each other at every step: with two threads a default
    `streamer train` took six times as long as with one, for the same metrics, while on idle
    cores two threads can at best halve the fit, a fraction of the whole run.

    `model` names the design in the progress lines of each fit (`_fit_once`); `interval` is
    their heartbeat's.
    """
    with threadpool_limits(limits=1, user_api="openmp"):
        estimator = _fit_once(
            HGB_PARAMS, features, labels, model=model, fit="early stopping", interval=interval
        )
        stopped_at = int(estimator.n_iter_)
        # validation_score_[i]: the score after i iterations (0: before any); higher is better.
        best = int(np.argmax(estimator.validation_score_))
        if 0 < best < stopped_at:
            estimator = _fit_once(
                HGB_PARAMS | {"max_iter": best},
                features,
                labels,
                model=model,
                fit="refit to the best iteration",
                interval=interval,
            )
    return estimator, stopped_at


def _fit_once(
    params: dict[str, Any],
    features: np.ndarray,
    labels: np.ndarray,
    *,
    model: str,
    fit: str,
    interval: float,
) -> HistGradientBoostingClassifier:
    """One fit, with a line as it starts and as it ends, and a heartbeat while it runs.

    A fit of the default training set takes seconds, one of a large file far longer, and
    scikit-learn says nothing meanwhile: off a terminal a `still_fitting` line every `interval`
    seconds shows the process is alive. The heartbeat's thread only reads the clock and logs;
    the estimator, its data and its parameters are the same as without it.
    """
    log.info(
        "fit_started",
        model=model,
        fit=fit,
        rows=len(labels),
        features=features.shape[1],
        max_iter=params["max_iter"],
    )
    started = time.perf_counter()
    with Heartbeat("still_fitting", interval=interval, model=model, fit=fit):
        estimator = HistGradientBoostingClassifier(**params).fit(features, labels)
    log.info(
        "fit_ended",
        model=model,
        fit=fit,
        iterations=int(estimator.n_iter_),
        seconds=round(time.perf_counter() - started, 2),
    )
    return estimator


def _max_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The score threshold with the best F1 on (labels, scores), and that F1."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The curve's last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(
        2 * precision * recall,
        denominator,
        out=np.zeros_like(denominator),
        where=denominator > 0,
    )
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def _evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Ranking metrics over the scores, and decision metrics for score >= threshold."""
    flagged = scores >= threshold
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "average_precision": float(average_precision_score(labels, scores)),
        "precision": float(precision_score(labels, flagged, zero_division=0)),
        "recall": float(recall_score(labels, flagged, zero_division=0)),
        "f1": float(f1_score(labels, flagged, zero_division=0)),
        "fraud_rate": float(labels.mean()),
    }
