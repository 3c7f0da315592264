"""The model slot: the scorer in use, and a new one loaded, verified and warmed beside it.

`streamer run` keeps its model in a `ModelSlot`. The slot watches the artefact and its card
(`artifact.card_path_for`) with one `os.stat` of each every `check_interval` seconds, called from
the scoring loop (`maintain`); `request_check` (the `SIGHUP` handler) forces a check at the next
turn. A model is replaced by renaming a new pair into place (`streamer train` and `streamer model
import` write that way), so a new version shows as a new (inode, mtime, size) of either file.

A change is loaded only once both files have stayed as they are for one check (a pair is renamed
in one file at a time: between the two renames the new artefact and the old card do not match).
Loading runs in a background thread, exactly as at start-up (`Scorer.from_path`, which is
`artifact.load_model`: hash, card, scikit-learn version, trusted types, features), then scores a
sample batch of feature rows: the first batch after the swap does not pay for lazy set-up, and a
model that fails on it, or returns scores outside [0, 1], is refused. The loop swaps the ready
scorer in between batches (`ready`, `swap`): the pipeline reads its scorer once per batch.

A refused model leaves the running one in place; the reason is logged once per version of the
files, and `refused` counts it. The threshold is the new card's, unless `STREAMER_THRESHOLD` is
set, which keeps overriding every model the slot loads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog

from streamer.errors import ConfigError, ModelRefusedError
from streamer.model.artifact import card_path_for
from streamer.model.scorer import Scorer

log = structlog.get_logger(__name__)

CHECK_SECONDS: Final = 2.0
"""How often the scorer looks at the artefact and its card (two `os.stat` calls)."""
WARM_ROWS: Final = 256
"""Synthetic feature rows a new model scores before it is swapped in."""
WARM_SEED: Final = 20_251_130

FileVersion = tuple[int, int, int] | None
"""(inode, mtime ns, size) of a file; None when it does not exist."""
Signature = tuple[FileVersion, FileVersion]
"""The versions of the artefact and of its card."""


def file_version(path: Path) -> FileVersion:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@dataclass(frozen=True, slots=True)
class _Outcome:
    signature: Signature
    scorer: Scorer | None
    reason: str | None


def sample_features(rows: int = WARM_ROWS, seed: int = WARM_SEED) -> np.ndarray:
    """Feature rows of synthetic transactions, each card's earlier rows as its history."""
    from streamer.features import build_features
    from streamer.synthetic import SyntheticWorld

    return build_features([event.record for event in SyntheticWorld(seed).generate(rows)])


class ModelSlot:
    """The scorer in use and its replacement; `maintain`, `ready` and `swap` are the loop's.

    Not thread-safe apart from `request_check` (a flag, safe in a signal handler); the loading
    thread hands its outcome over through one attribute.
    """

    def __init__(
        self,
        scorer: Scorer,
        model_path: Path,
        *,
        threshold: float | None = None,
        check_interval: float = CHECK_SECONDS,
        load: Callable[[Path, float | None], Scorer] = Scorer.from_path,
        warm: Callable[[], np.ndarray] = sample_features,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.current = scorer
        self._model_path = model_path
        self._card_path = card_path_for(model_path)
        self._threshold = threshold
        self._check_interval = check_interval
        self._load = load
        self._warm = warm
        self._clock = clock
        self._next_check = clock() + check_interval
        self._forced = False
        self._serving = self._signature()
        """The files' versions when the model in use was loaded (or last looked at)."""
        self._seen = self._serving
        """The versions seen at the last check: a change loads once it is seen twice."""
        self._tried: Signature | None = None
        """The versions last loaded (or refused): not loaded again unless forced."""
        self._thread: threading.Thread | None = None
        self._outcome: _Outcome | None = None
        self._ready: Scorer | None = None
        self.reloads = 0
        """New models swapped in."""
        self.refused = 0
        """New models refused (the running one kept serving)."""

    def _signature(self) -> Signature:
        return (file_version(self._model_path), file_version(self._card_path))

    # -- the loop's calls ------------------------------------------------------------------------

    def request_check(self) -> None:
        """Look at the files, and load them, at the next `maintain` (the SIGHUP handler)."""
        self._forced = True

    def maintain(self) -> None:
        """Collect a finished load; look at the files when the interval is up (or forced)."""
        if self._outcome is not None:
            self._collect()
        now = self._clock()
        if self._thread is not None or (not self._forced and now < self._next_check):
            return
        self._next_check = now + self._check_interval
        forced, self._forced = self._forced, False
        signature = self._signature()
        seen, self._seen = self._seen, signature
        if forced:
            log.info("model check requested", model_path=str(self._model_path))
            self._start(signature)
        elif signature != self._serving and signature == seen and signature != self._tried:
            self._start(signature)

    @property
    def ready(self) -> bool:
        """A new verified, warmed scorer waits to be swapped in."""
        return self._ready is not None

    def swap(self) -> Scorer:
        """Put the waiting scorer in use and return it (call between batches only)."""
        new = self._ready
        assert new is not None, "swap() without a ready model"
        old, self.current, self._ready = self.current, new, None
        self.reloads += 1
        log.info(
            "model reloaded",
            **new.log_fields(),
            previous_version=old.version,
            previous_threshold=old.threshold,
        )
        return new

    def close(self) -> None:
        """Wait for a load under way (it holds no resources; it is not waited for long)."""
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    # -- loading, off the loop's thread ----------------------------------------------------------

    def _start(self, signature: Signature) -> None:
        self._tried = signature
        self._thread = threading.Thread(
            target=self._load_and_warm, args=(signature,), name="model-reload", daemon=True
        )
        self._thread.start()

    def _load_and_warm(self, signature: Signature) -> None:
        scorer: Scorer | None = None
        reason: str | None = None
        try:
            scorer = self._load(self._model_path, self._threshold)
            scores = scorer.score(self._warm())
            if not np.all((scores >= 0.0) & (scores <= 1.0)):  # NaN fails too
                raise ModelRefusedError(
                    f"model {scorer.version} returned scores outside [0, 1] on a sample batch"
                )
        except (ModelRefusedError, ConfigError) as exc:
            scorer, reason = None, str(exc)
        except Exception as exc:  # the model is third-party code: whatever it raises refuses it
            scorer, reason = None, f"model failed on a sample batch: {type(exc).__name__}: {exc}"
        self._outcome = _Outcome(signature, scorer, reason)

    def _collect(self) -> None:
        thread, outcome = self._thread, self._outcome
        assert thread is not None
        assert outcome is not None
        thread.join()
        self._thread, self._outcome = None, None
        self._serving = self._seen = outcome.signature
        scorer = outcome.scorer
        if scorer is None:
            self.refused += 1
            log.error(
                "new model refused, the running model keeps serving",
                model_path=str(self._model_path),
                reason=outcome.reason,
                model_version=self.current.version,
            )
            return
        current = self.current
        if scorer.sha256 == current.sha256 and scorer.threshold == current.threshold:
            log.info("model unchanged", model_version=current.version)
            return
        self._ready = scorer
