"""Train the fraud model on the synthetic world and save it with its model card.

The labelled set comes from `SyntheticWorld(seed)` in event-time order and is split by time, as
production data would be: the first 70% trains, the next 15% (validation) chooses the threshold,
the last 15% (test) gives the metrics on the card. Training never sees the future.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import sklearn
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

from streamer.features import CATEGORICAL_FEATURES, FEATURE_ORDER, build_features
from streamer.model.artifact import ARTIFACT_FORMAT, ModelCard, save_model
from streamer.synthetic import SyntheticWorld

DEFAULT_TRAINING_SIZE: Final = 200_000
DEFAULT_SEED: Final = 7
MODEL_NAME: Final = "fraud-hgb"

MIN_TRAINING_SIZE: Final = 5_000
"""Below this the validation and test splits hold too few frauds to choose or judge anything."""

TRAIN_SHARE: Final = 0.70
VALIDATION_SHARE: Final = 0.15
"""The test split is the rest (0.15), the latest events."""

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

log = structlog.get_logger(__name__)


def train_model(
    model_path: Path, *, seed: int = DEFAULT_SEED, size: int = DEFAULT_TRAINING_SIZE
) -> ModelCard:
    """Train on `size` synthetic transactions from `seed`, save to `model_path`, return the card.

    The threshold follows `THRESHOLD_RULE`; the card's metrics are on the test split: roc_auc,
    average_precision, precision, recall and f1 at the threshold, and the test fraud_rate.
    Raises `ValueError` when `size` is below `MIN_TRAINING_SIZE`.
    """
    if size < MIN_TRAINING_SIZE:
        raise ValueError(f"size must be at least {MIN_TRAINING_SIZE}, got {size}")
    started = time.perf_counter()
    log.info("training_started", seed=seed, size=size, model_path=str(model_path))

    labelled = list(SyntheticWorld(seed).generate(size))
    features = build_features([item.record for item in labelled])
    labels = np.fromiter((item.is_fraud for item in labelled), dtype=bool, count=size)
    train_end = int(size * TRAIN_SHARE)
    validation_end = int(size * (TRAIN_SHARE + VALIDATION_SHARE))
    splits = {
        "train": slice(0, train_end),
        "validation": slice(train_end, validation_end),
        "test": slice(validation_end, size),
    }
    for split, rows in splits.items():
        if not labels[rows].any():
            raise ValueError(f"the {split} split holds no fraud; use a larger size")

    fit_started = time.perf_counter()
    estimator, stopped_at = _fit(features[splits["train"]], labels[splits["train"]])
    fit_seconds = time.perf_counter() - fit_started
    log.info(
        "model_fitted",
        iterations=int(estimator.n_iter_),
        early_stopping_at=stopped_at,
        fit_seconds=round(fit_seconds, 2),
    )

    validation = splits["validation"]
    validation_scores = estimator.predict_proba(features[validation])[:, 1]
    threshold, validation_f1 = _max_f1_threshold(labels[validation], validation_scores)
    test = splits["test"]
    metrics = _evaluate(labels[test], estimator.predict_proba(features[test])[:, 1], threshold)
    metrics["validation_f1"] = validation_f1
    metrics["validation_average_precision"] = float(
        average_precision_score(labels[validation], validation_scores)
    )

    card = ModelCard(
        name=MODEL_NAME,
        version="",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        sha256="",
        sklearn_version=sklearn.__version__,
        artifact_format=ARTIFACT_FORMAT,
        features=list(FEATURE_ORDER),
        categorical_features=list(CATEGORICAL_FEATURES),
        threshold=threshold,
        metrics=metrics,
        training={
            "data": "streamer.synthetic.SyntheticWorld",
            "seed": seed,
            "size": size,
            "fraud_rate": float(labels.mean()),
            "split": "by event time",
            "split_sizes": {name: rows.stop - rows.start for name, rows in splits.items()},
            "algorithm": "sklearn.ensemble.HistGradientBoostingClassifier",
            "params": HGB_PARAMS,
            "category_encoding": "ordered codes (features.CATEGORICAL_FEATURES)",
            "iterations": int(estimator.n_iter_),
            "early_stopping_at": stopped_at,
            "threshold_rule": THRESHOLD_RULE,
            "fit_seconds": round(fit_seconds, 2),
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


def _fit(features: np.ndarray, labels: np.ndarray) -> tuple[HistGradientBoostingClassifier, int]:
    """Fit with early stopping; keep the trees up to the best validation loss.

    Early stopping ends `n_iter_no_change` iterations after the best one and keeps those trailing
    trees, which cost prediction time and did not help. A second fit capped at the best iteration
    grows exactly the same first trees (same data, same `random_state`, same validation split).
    Returns the estimator and the iteration at which the first fit stopped.
    """
    estimator = HistGradientBoostingClassifier(**HGB_PARAMS).fit(features, labels)
    stopped_at = int(estimator.n_iter_)
    # validation_score_[i] is the score after i iterations (0: before the first); higher is better.
    best = int(np.argmax(estimator.validation_score_))
    if 0 < best < stopped_at:
        estimator = HistGradientBoostingClassifier(**(HGB_PARAMS | {"max_iter": best}))
        estimator.fit(features, labels)
    return estimator, stopped_at


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
