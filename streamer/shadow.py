"""Shadow scoring: a challenger model scores the champion's feature matrix, beside it. No Kafka.

The scoring loop hands every scored batch (`pipeline.Scored`) to `Shadow.score`: the challenger
scores the same rows the champion scored (`Scored.features`), and gets a verdict of its own for
each record the champion gave a verdict (same schema; the challenger's name, version and
threshold). The champion's verdicts are never touched. `compare` says how far the two agree.

A challenger that raises, or returns anything but one score in [0, 1] per row, is switched off
for the rest of the run with one log line; the champion goes on scoring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog

from streamer.errors import ConfigError, ModelRefusedError
from streamer.model.scorer import Scorer
from streamer.pipeline import Scored
from streamer.serde import encode_verdicts

log = structlog.get_logger(__name__)

AGREEMENT_THRESHOLDS: Final = ("champion", "challenger", "own")
"""How agreement is counted: both models' scores against the champion's threshold, against the
challenger's, and each model against its own (the decisions each would make)."""


@dataclass(frozen=True, slots=True)
class Comparison:
    """How the two models scored the same records."""

    records: int
    agreements: dict[str, int]
    """Per `AGREEMENT_THRESHOLDS` label: records on which both flag, or both do not."""
    differences: np.ndarray
    """Challenger score minus champion score, per record."""


def compare(
    champion: np.ndarray,
    challenger: np.ndarray,
    champion_threshold: float,
    challenger_threshold: float,
) -> Comparison:
    """Agreement of two score arrays (same records, same order) at both thresholds."""
    champion_flags = champion >= champion_threshold
    challenger_flags = challenger >= challenger_threshold
    agreements = {
        "champion": int(np.count_nonzero(champion_flags == (challenger >= champion_threshold))),
        "challenger": int(np.count_nonzero((champion >= challenger_threshold) == challenger_flags)),
        "own": int(np.count_nonzero(champion_flags == challenger_flags)),
    }
    return Comparison(len(champion), agreements, challenger - champion)


@dataclass(frozen=True, slots=True)
class ShadowBatch:
    """The challenger's verdicts of one batch, and how it compares with the champion."""

    indexes: list[int]
    """The input records (indexes into the batch) the verdicts are for, in order."""
    verdicts: list[bytes]
    comparison: Comparison


class Shadow:
    """A challenger scored beside the champion; not thread-safe (one per scoring loop)."""

    def __init__(self, scorer: Scorer) -> None:
        self.scorer = scorer
        self.active = True
        """False once the challenger failed: it scores nothing more in this run."""

    @classmethod
    def load(cls, path: Path) -> Shadow | None:
        """The challenger at `path`, verified as a champion is; None (logged) when refused."""
        try:
            scorer = Scorer.from_path(path)
        except (ModelRefusedError, ConfigError) as exc:
            log.error(
                "shadow model refused, scoring without it",
                setting="STREAMER_SHADOW_MODEL_PATH",
                reason=str(exc),
            )
            return None
        log.info(
            "shadow model loaded",
            model_name=scorer.name,
            model_version=scorer.version,
            model_sha256=scorer.sha256,
            threshold=scorer.threshold,
        )
        return cls(scorer)

    def score(self, scored: Scored, *, scored_at: int | None = None) -> ShadowBatch | None:
        """The challenger's verdicts for the records of `scored` that got a champion verdict.

        None when there is nothing to score or the challenger is off (or fails now: it is then
        switched off, with one log line).
        """
        if not self.active:
            return None
        batch, verdicts = scored.batch, scored.verdicts
        keep = [verdicts[index] is not None for index in batch.indexes]
        if not any(keep):
            return None
        scorer = self.scorer
        try:
            scores = np.asarray(scorer.score(scored.features), dtype=np.float64)
            if scores.shape != (len(batch.indexes),):
                raise ValueError(
                    f"returned {scores.shape} scores for {len(batch.indexes)} feature rows"
                )
            if not np.all((scores >= 0.0) & (scores <= 1.0)):  # NaN fails too
                raise ValueError("returned scores outside [0, 1]")
        except Exception as exc:  # third-party code: whatever it raises switches it off
            self.active = False
            log.error(
                "shadow model failed, switched off; verdicts are not affected",
                model_version=scorer.version,
                error=f"{type(exc).__name__}: {exc}",
            )
            return None
        encoded = encode_verdicts(
            batch,
            scores.tolist(),
            threshold=scorer.threshold,
            model_name=scorer.name,
            model_version=scorer.version,
            scored_at=time.time_ns() // 1_000_000 if scored_at is None else scored_at,
        )
        mask = np.array(keep, dtype=bool)
        comparison = compare(scored.scores[mask], scores[mask], scored.threshold, scorer.threshold)
        return ShadowBatch(
            [index for index, kept in zip(batch.indexes, keep, strict=True) if kept],
            [value for value, kept in zip(encoded, keep, strict=True) if kept],
            comparison,
        )
