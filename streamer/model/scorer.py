"""Batch of feature rows in, fraud probabilities out: the model runtime of the scoring loop.

No Kafka, no records: the app builds the matrix with `features.build_features`, calls `score`
once per batch, and compares each score with `threshold`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final

import numpy as np
from threadpoolctl import ThreadpoolController

from streamer.errors import ConfigError
from streamer.features import FEATURE_ORDER
from streamer.model.artifact import LoadedModel, ModelCard, load_model
from streamer.model.trees import FlatTrees

FLAT_TREES_MAX_ROWS: Final = 128
"""Matrices of at most this many rows are scored by `FlatTrees` (the same scores, bit for bit):
below it, walking every tree at once costs less than scikit-learn's call per tree (for the
model `streamer train` builds, 1.4 against 1.8 ms at 128 rows; the two meet near 190)."""


class Scorer:
    """Scores feature matrices with a verified model; not thread-safe (one per scoring loop).

    Prediction runs with OpenMP (and BLAS) limited to one thread: HistGradientBoosting's predict
    otherwise forks a thread team per call, which costs more than it saves on the few hundred
    rows of a poll batch and competes with the Kafka client's threads. A binary
    HistGradientBoosting model scores small matrices through `FlatTrees`, without scikit-learn's
    fixed cost per call.
    """

    def __init__(self, model: LoadedModel, *, threshold: float | None = None) -> None:
        """Use `model`, flagging scores >= `threshold` (None: the card's threshold).

        Raises `ConfigError` when the threshold is not a number in [0, 1].
        """
        chosen = model.card.threshold if threshold is None else threshold
        if not (math.isfinite(chosen) and 0.0 <= chosen <= 1.0):
            raise ConfigError(f"threshold must be between 0 and 1, got {chosen!r}")
        self._estimator = model.estimator
        self._card = model.card
        self._threshold = float(chosen)
        # Inspecting the loaded thread pools walks the process's shared libraries: do it once.
        self._threadpools = ThreadpoolController()
        with self._threadpools.limit(limits=1):
            self._flat = FlatTrees.of(self._estimator)

    @classmethod
    def from_path(cls, model_path: Path, threshold: float | None = None) -> Scorer:
        """Load and verify the artefact at `model_path` (see `artifact.load_model`).

        Raises `ModelRefusedError` for an artefact that fails verification and `ConfigError`
        for a threshold outside [0, 1].
        """
        return cls(load_model(model_path), threshold=threshold)

    @property
    def name(self) -> str:
        """Model family from the card, e.g. "fraud-hgb"."""
        return self._card.name

    @property
    def version(self) -> str:
        """Model version from the card; unique per artefact."""
        return self._card.version

    @property
    def sha256(self) -> str:
        """sha256 of the artefact file, verified at load."""
        return self._card.sha256

    @property
    def threshold(self) -> float:
        """Decision threshold in use: a score >= threshold means fraud."""
        return self._threshold

    def log_fields(self) -> dict[str, str | float]:
        """The model in use as log fields: name, version, sha256 and threshold."""
        return {
            "model_name": self.name,
            "model_version": self.version,
            "model_sha256": self.sha256,
            "threshold": self.threshold,
        }

    @property
    def card(self) -> ModelCard:
        """The model card the artefact was verified against."""
        return self._card

    def score(self, features: np.ndarray) -> np.ndarray:
        """P(fraud) for each row of a `build_features` matrix: float64 in [0, 1], one per row.

        NaN features are missing values, which the model handles. Raises `ValueError` when the
        matrix is not 2-D with `len(FEATURE_ORDER)` columns. One predict_proba call per batch
        (or `FlatTrees`, for a few rows).
        """
        if features.ndim != 2 or features.shape[1] != len(FEATURE_ORDER):
            raise ValueError(
                f"expected a matrix of shape (n, {len(FEATURE_ORDER)}), got {features.shape}"
            )
        if features.shape[0] == 0:
            return np.empty(0, dtype=np.float64)
        if self._flat is not None and features.shape[0] <= FLAT_TREES_MAX_ROWS:
            return self._flat.score(features)
        with self._threadpools.limit(limits=1):
            probabilities = self._estimator.predict_proba(features)
        scores: np.ndarray = np.asarray(probabilities[:, 1], dtype=np.float64)
        return scores
