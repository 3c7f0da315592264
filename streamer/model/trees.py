"""A binary HistGradientBoostingClassifier's P(fraud) for a few rows at a time, without its
per-tree calls.

scikit-learn scores a matrix one tree at a time, a Python call into its Cython code per tree,
plus input checks: about a millisecond a call for the model's trees however few rows it has, which
is most of a small batch's cost in the scoring loop. `FlatTrees` holds every tree's nodes in a
few flat arrays and walks all rows through all trees at once, a level per step, in NumPy: cheaper
below a few dozen rows, dearer above (`Scorer` uses it only there).

The scores are scikit-learn's bit for bit: the same decisions (a missing value goes where its
node sends missing values, any other value left when at most the node's threshold), the leaf
values added to the baseline one tree at a time in the trees' order, then the model's own inverse
link (the logistic function). `FlatTrees.of` checks that on a probe matrix, and declines a model
it does not cover (several classes, categorical splits, a preprocessor) or whose scores differ.

A step is four NumPy operations, so missing values are settled before the walk: each row is
widened to three copies of its features, missing values made -inf in the first (read by nodes
that send them left: -inf is never above a threshold), +inf in the second (nodes that send them
right), and the third says only whether a value is missing (read, with threshold 0.5, by a node
whose threshold is +inf and which sends missing values right: every present value goes left
there, so +inf would not do). A node's children sit side by side, so "above the threshold" (0 or
1) added to the first child's index picks the next node.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

_PROBE_ROWS: Final = 512
_PROBE_SEED: Final = 20_261_130


class FlatTrees:
    """Every tree of one binary HistGradientBoostingClassifier, flattened; see the module."""

    def __init__(self, estimator: HistGradientBoostingClassifier) -> None:
        """Flatten `estimator`'s trees; `ValueError` when it is not a model this covers."""
        if type(estimator) is not HistGradientBoostingClassifier:
            raise ValueError(f"not a HistGradientBoostingClassifier: {type(estimator).__name__}")
        if estimator.n_trees_per_iteration_ != 1:
            raise ValueError("more than two classes")
        if getattr(estimator, "_preprocessor", None) is not None:
            raise ValueError("the model preprocesses its input")
        predictors = estimator._predictors
        trees = [iteration[0].nodes for iteration in predictors]
        if not trees:
            raise ValueError("the model has no trees")
        nodes = np.concatenate(trees)
        if nodes["is_categorical"].any():
            raise ValueError("the model has categorical splits")
        sizes = [len(tree) for tree in trees]
        roots = np.zeros(len(trees), dtype=np.intp)
        np.cumsum(sizes[:-1], out=roots[1:])
        first = np.repeat(roots, sizes)
        leaf = nodes["is_leaf"].astype(bool)
        n_features = int(estimator.n_features_in_)
        feature = nodes["feature_idx"].astype(np.intp)
        threshold = nodes["num_threshold"].astype(np.float64)
        missing_left = nodes["missing_go_to_left"].astype(bool)
        # Which copy of the row a node reads (see the module): missing values -inf, +inf, or
        # whether a value is missing.
        only_missing_right = ~leaf & ~missing_left & (threshold == np.inf)
        column = np.where(missing_left, feature, feature + n_features)
        column = np.where(only_missing_right, feature + 2 * n_features, column)
        threshold = np.where(only_missing_right, 0.5, threshold)
        # A leaf is its own child both ways: rows that reach one stay there.
        itself = np.arange(len(nodes), dtype=np.intp)
        left = np.where(leaf, itself, nodes["left"].astype(np.intp) + first)
        right = np.where(leaf, itself, nodes["right"].astype(np.intp) + first)
        # Node i at 2i and 2i + 1 (one per way out), so the step's index is 2i + (above or not).
        self._column = np.repeat(np.where(leaf, 0, column), 2).astype(np.intp)
        self._threshold = np.repeat(np.where(leaf, np.inf, threshold), 2)
        self._child = np.empty(2 * len(nodes), dtype=np.intp)
        self._child[0::2] = 2 * left
        self._child[1::2] = 2 * right
        self._value = nodes["value"].astype(np.float64)
        self._roots = 2 * roots
        self._levels = int(nodes["depth"].max())
        self._baseline = float(estimator._baseline_prediction[0, 0])
        self._inverse_link = estimator._loss.link.inverse
        self.n_features = n_features

    @classmethod
    def of(cls, estimator: Any) -> FlatTrees | None:
        """`FlatTrees` of `estimator` if it covers it and scores a probe matrix exactly as
        `predict_proba` does; otherwise None."""
        try:
            flat = cls(estimator)
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):
            return None
        probe = _probe(flat.n_features)
        expected = np.asarray(estimator.predict_proba(probe)[:, 1], dtype=np.float64)
        if not np.array_equal(flat.score(probe).view(np.int64), expected.view(np.int64)):
            return None
        return flat

    def score(self, features: np.ndarray) -> np.ndarray:
        """P(fraud) of each row of a float64 matrix of `n_features` columns."""
        rows, width = features.shape[0], self.n_features
        values = np.asarray(features, dtype=np.float64)
        missing = np.isnan(values)
        wide = np.empty((rows, 3, width), dtype=np.float64)
        wide[:, 0] = np.where(missing, -np.inf, values)
        wide[:, 1] = np.where(missing, np.inf, values)
        wide[:, 2] = missing
        data = wide.ravel()
        row_start = (np.arange(rows, dtype=np.intp) * (3 * width))[:, None]
        # Twice each tree's node index (see `__init__`).
        node = np.broadcast_to(self._roots, (rows, len(self._roots))).copy()
        column, threshold, child = self._column, self._threshold, self._child
        for _ in range(self._levels):
            value = data[row_start + column[node]]
            node = child[node + (value > threshold[node])]
        # The baseline, then each tree's leaf added in turn, as scikit-learn sums them.
        terms = np.empty((rows, len(self._roots) + 1), dtype=np.float64)
        terms[:, 0] = self._baseline
        terms[:, 1:] = self._value[node // 2]
        raw = np.add.accumulate(terms, axis=1)[:, -1]
        scores: np.ndarray = self._inverse_link(raw)
        return scores


def _probe(n_features: int) -> np.ndarray:
    """Rows that reach many leaves: values over several scales, some missing, zeros."""
    rng = np.random.default_rng(_PROBE_SEED)
    scales = 10.0 ** rng.integers(-2, 5, size=n_features)
    probe = rng.normal(0.0, 1.0, size=(_PROBE_ROWS, n_features)) * scales
    probe[rng.random(probe.shape) < 0.1] = np.nan
    probe[rng.random(probe.shape) < 0.05] = 0.0
    return probe
