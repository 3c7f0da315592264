"""The model artefact on disk: save it with its card, and load it only when everything checks out.

An artefact is a skops file (`fraud-model.skops`) next to its model card
(`fraud-model.card.json`). skops stores the estimator as a zip of JSON and numpy arrays and
rebuilds only types it is told to trust, so loading never unpickles anything. `load_model`
refuses, with `ModelRefusedError` saying what is wrong and what to do, unless the artefact
exists, the card is valid, the file's sha256 matches the card, the running scikit-learn is the
one that trained the model, the card's features are `features.FEATURE_ORDER`, and the file holds
no type beyond skops' defaults and our reviewed `TRUSTED_TYPES`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pydantic
import sklearn
import skops.io
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.ensemble import HistGradientBoostingClassifier

from streamer.errors import ModelRefusedError
from streamer.events import describe_validation_error
from streamer.features import CATEGORICAL_FEATURES, FEATURE_ORDER

ARTIFACT_FORMAT: Final = "skops"
"""The only artefact format we write and read."""

MODEL_MAJOR_VERSION: Final = 3
"""Leading part of model versions; bump it when the feature contract changes."""

TRUSTED_TYPES: Final[frozenset[str]] = frozenset(
    {
        # The fitted trees of HistGradientBoosting (arrays of nodes and bin thresholds).
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
    }
)
"""Types beyond skops' built-in safe list that our HistGradientBoostingClassifier artefact needs.

Reviewed from `skops.io.get_untrusted_types` on an artefact written by `streamer train` with
scikit-learn 1.9.1 and skops 0.16: scikit-learn internals only. An artefact holding anything else
is refused, including one trained before the category columns became ordered codes: that model's
categorical preprocessing needed `functools.partial`, no longer trusted. Review again when
upgrading scikit-learn or skops, never by copying the list blindly.
"""

_FILE_MODE: Final = 0o644
_TRAIN_HINT: Final = "run `streamer train` to write a fresh model and card"


class ModelCard(BaseModel):
    """What a model is, how it was trained and how well it did; stored as JSON beside it.

    `save_model` fills `sha256` and `version` (pass "" until then); `load_model` checks the card
    against the artefact and the running code before anything is scored.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    """Model family, e.g. "fraud-hgb"."""
    version: str
    """Unique per artefact: "<major>.<yyyymmdd of created_at>.<first 8 hex of sha256>"."""
    created_at: str
    """When training finished, ISO 8601 with a UTC offset."""
    sha256: str
    """Hex sha256 of the artefact file's bytes."""
    sklearn_version: str
    """scikit-learn version that trained the model; loading needs the same one."""
    artifact_format: str = ARTIFACT_FORMAT
    features: list[str]
    """The feature columns the model expects, in order (`features.FEATURE_ORDER`)."""
    categorical_features: list[str]
    threshold: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    """Default decision threshold: a transaction is flagged when its score >= threshold."""
    metrics: dict[str, float]
    """Held-out test metrics (roc_auc, average_precision, precision, recall, f1, ...)."""
    training: dict[str, Any]
    """Seed, sizes, fraud rate, splits, algorithm and parameters, threshold rule."""

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, value: str) -> str:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError("not an ISO 8601 timestamp") from None
        if moment.utcoffset() is None or moment.utcoffset() != UTC.utcoffset(None):
            raise ValueError("must carry a UTC offset (+00:00 or Z)")
        return value


@dataclass(frozen=True)
class LoadedModel:
    """An estimator that passed every check in `load_model`, with the card that vouches for it."""

    estimator: Any
    card: ModelCard


def card_path_for(model_path: Path) -> Path:
    """The card beside an artefact: models/fraud-model.skops -> models/fraud-model.card.json."""
    return model_path.with_suffix(".card.json")


def save_model(estimator: Any, card: ModelCard, model_path: Path) -> ModelCard:
    """Write the estimator as skops and its card as JSON; return the card as written.

    Fills `sha256` (of the bytes written), `version`, `sklearn_version` (the running one) and
    `artifact_format`; the rest comes from `card`. Each file is written to a temporary file in
    the same directory and renamed into place, the artefact first: a reader racing a save sees
    either the old pair or a new artefact whose sha256 the old card refuses, never a torn file.
    """
    data = skops.io.dumps(estimator)
    digest = hashlib.sha256(data).hexdigest()
    created = datetime.fromisoformat(card.created_at)
    saved = ModelCard.model_validate(
        card.model_dump()
        | {
            "sha256": digest,
            "version": f"{MODEL_MAJOR_VERSION}.{created:%Y%m%d}.{digest[:8]}",
            "sklearn_version": sklearn.__version__,
            "artifact_format": ARTIFACT_FORMAT,
        }
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(model_path, data)
    _write_atomically(card_path_for(model_path), saved.model_dump_json(indent=2).encode() + b"\n")
    return saved


def load_model(model_path: Path) -> LoadedModel:
    """Load a verified estimator and its card, or raise `ModelRefusedError` saying why not.

    The artefact is read once; the checksum is computed over exactly the bytes then parsed.
    """
    card_path = card_path_for(model_path)
    data = _read_bytes(model_path, "model artefact")
    card = _read_card(card_path)

    if card.artifact_format != ARTIFACT_FORMAT:
        raise ModelRefusedError(
            f"model card {card_path} names format {card.artifact_format!r}, only"
            f" {ARTIFACT_FORMAT!r} is loaded: {_TRAIN_HINT}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.sha256:
        raise ModelRefusedError(
            f"model artefact {model_path} has sha256 {digest}, its card {card_path} says"
            f" {card.sha256 or '(none)'}: the file was changed or belongs to another card;"
            f" restore the pair or {_TRAIN_HINT}"
        )
    if card.sklearn_version != sklearn.__version__:
        raise ModelRefusedError(
            f"model {card.version} was trained with scikit-learn {card.sklearn_version}, this"
            f" process runs {sklearn.__version__}: install that version or {_TRAIN_HINT}"
        )
    if card.features != list(FEATURE_ORDER) or card.categorical_features != list(
        CATEGORICAL_FEATURES
    ):
        raise ModelRefusedError(
            f"model {card.version} expects features {card.features} (categorical"
            f" {card.categorical_features}), this code builds {list(FEATURE_ORDER)} (categorical"
            f" {list(CATEGORICAL_FEATURES)}): {_TRAIN_HINT}"
        )

    # Anything that fails here is a file we cannot vouch for (a pickle is not a zip, so skops
    # rejects it before any byte is interpreted as code).
    try:
        untrusted = skops.io.get_untrusted_types(data=data)
    except Exception as exc:
        raise ModelRefusedError(
            f"model artefact {model_path} is not a valid skops file ({type(exc).__name__}:"
            f" {exc}): {_TRAIN_HINT}"
        ) from exc
    unexpected = sorted(set(untrusted) - TRUSTED_TYPES)
    if unexpected:
        raise ModelRefusedError(
            f"model artefact {model_path} contains types outside TRUSTED_TYPES: {unexpected};"
            f" it was not written by `streamer train` for this code: {_TRAIN_HINT}"
        )
    try:
        estimator = skops.io.loads(data, trusted=sorted(TRUSTED_TYPES))
    except Exception as exc:
        raise ModelRefusedError(
            f"model artefact {model_path} could not be loaded ({type(exc).__name__}: {exc}):"
            f" {_TRAIN_HINT}"
        ) from exc

    _check_estimator(estimator, model_path)
    return LoadedModel(estimator=estimator, card=card)


def _check_estimator(estimator: Any, model_path: Path) -> None:
    """Refuse an estimator that is not the binary classifier the scorer expects."""
    if not isinstance(estimator, HistGradientBoostingClassifier):
        raise ModelRefusedError(
            f"model artefact {model_path} holds a {type(estimator).__name__}, not a"
            f" HistGradientBoostingClassifier: {_TRAIN_HINT}"
        )
    n_features = getattr(estimator, "n_features_in_", None)
    classes = getattr(estimator, "classes_", None)
    if n_features != len(FEATURE_ORDER) or classes is None or len(classes) != 2:
        raise ModelRefusedError(
            f"model artefact {model_path} is not a fitted binary classifier over"
            f" {len(FEATURE_ORDER)} features (n_features_in_={n_features}, classes_={classes}):"
            f" {_TRAIN_HINT}"
        )


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelRefusedError(f"no {what} at {path}: {_TRAIN_HINT}") from None
    except OSError as exc:
        raise ModelRefusedError(f"cannot read {what} {path}: {exc}") from exc


def _read_card(card_path: Path) -> ModelCard:
    raw = _read_bytes(card_path, "model card")
    try:
        return ModelCard.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise ModelRefusedError(
            f"model card {card_path} is invalid ({describe_validation_error(exc)}): {_TRAIN_HINT}"
        ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a synced temporary file and a rename in the same directory."""
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed before the rename, below
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file owner-only; the scorer may run as another user.
        os.chmod(handle.name, _FILE_MODE)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
