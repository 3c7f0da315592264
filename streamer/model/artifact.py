"""The model artefact on disk: save it with its card, and load it only when everything checks out.

An artefact is a skops file (`fraud-model.skops`) next to its model card
(`fraud-model.card.json`). skops stores the estimator as a zip of JSON and numpy arrays and
rebuilds only types it is told to trust, so loading never unpickles anything. `load_model`
refuses, with `ModelRefusedError` saying what is wrong and what to do, unless the artefact
exists, the card is valid, the file's sha256 matches the card, the running scikit-learn is the
one that trained the model, the card's features are `features.FEATURE_ORDER`, the file holds no
type beyond skops' defaults and the reviewed types of its model family (`CLASSIFIER_TYPES`,
`PREPROCESSING_TYPES`), and the estimator is a fitted binary classifier of a supported family:
one of `CLASSIFIER_TYPES`, alone or as the last step of a scikit-learn `Pipeline` whose earlier
steps are `PREPROCESSING_TYPES` (see `check_supported`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pydantic
import sklearn
import skops.io
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    ExtraTreesClassifier,
    HistGradientBoostingClassifier,
    RandomForestClassifier,
)
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import (
    MaxAbsScaler,
    MinMaxScaler,
    OneHotEncoder,
    PowerTransformer,
    QuantileTransformer,
    RobustScaler,
    StandardScaler,
)

from streamer.errors import ModelRefusedError
from streamer.events import describe_validation_error
from streamer.features import CATEGORICAL_FEATURES, FEATURE_ORDER

ARTIFACT_FORMAT: Final = "skops"
"""The only artefact format we write and read."""

MODEL_MAJOR_VERSION: Final = 3
"""Leading part of model versions; bump it when the feature contract changes."""

_TREE: Final = "sklearn.tree._tree.Tree"
_HGB_TREE: Final = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"

CLASSIFIER_TYPES: Final[dict[type, frozenset[str]]] = {
    # The fitted trees of HistGradientBoosting (arrays of nodes and bin thresholds).
    HistGradientBoostingClassifier: frozenset({_HGB_TREE}),
    # The fitted decision trees of the forests (the Cython tree: node arrays and values).
    RandomForestClassifier: frozenset({_TREE}),
    ExtraTreesClassifier: frozenset({_TREE}),
    # Coefficients and intercept are numpy arrays: nothing beyond skops' defaults.
    LogisticRegression: frozenset(),
}
"""The classifier families streamer loads, each with the types beyond skops' built-in safe list
that a fitted model of that family needs.

Reviewed from `skops.io.get_untrusted_types` on models of each family fitted on the feature
matrix (NaN included) with scikit-learn 1.9.1 and skops 0.16: scikit-learn's own fitted trees
only. Exact classes: a subclass is someone else's code. A HistGradientBoostingClassifier with
native categorical features also needs `functools.partial` and
`sklearn.utils.validation.check_array`, which are not trusted (a partial can wrap any callable);
`streamer train` passes the category columns as ordered codes instead. Review again when
upgrading scikit-learn or skops, never by copying the list blindly.
"""

PREPROCESSING_TYPES: Final[dict[type, frozenset[str]]] = {
    # Stores the dtype it was fitted on; skops rebuilds it as numpy.dtype(<name>), no code.
    SimpleImputer: frozenset({"numpy.dtype"}),
    MissingIndicator: frozenset(),
    StandardScaler: frozenset(),
    MinMaxScaler: frozenset(),
    MaxAbsScaler: frozenset(),
    RobustScaler: frozenset(),
    QuantileTransformer: frozenset(),
    PowerTransformer: frozenset(),
    OneHotEncoder: frozenset(),
    # Holds other steps (checked one by one) and column selections (ints, slices, lists).
    ColumnTransformer: frozenset(),
}
"""The preprocessing steps a `Pipeline` may put before its classifier, reviewed as above.

A step may also be "passthrough", a `Pipeline` of these, or a `ColumnTransformer` of these (or
"passthrough" / "drop"). Anything that runs user code (FunctionTransformer, a custom class) is
refused: skops could only rebuild it by trusting arbitrary callables.
"""

TRUSTED_TYPES: Final[frozenset[str]] = frozenset().union(
    *CLASSIFIER_TYPES.values(), *PREPROCESSING_TYPES.values()
)
"""Every type any supported family needs: nothing outside it is ever rebuilt.

A file is first checked against this union; once loaded, its estimator must need every type it
held (`check_supported`), so a LogisticRegression artefact carrying a tree is refused too.
"""

SUPPORTED_MODELS: Final = (
    f"{', '.join(cls.__name__ for cls in CLASSIFIER_TYPES)}, alone or as the last step of a"
    f" scikit-learn Pipeline after {', '.join(cls.__name__ for cls in PREPROCESSING_TYPES)}"
    " steps"
)
"""One sentence for messages: what `load_model` and `streamer model import` accept."""

_FILE_MODE: Final = 0o644
_NEW_MODEL_HINT: Final = (
    "write a fresh pair with `streamer train`, or import your own model with"
    " `streamer model import`"
)
_FEATURES_HINT: Final = (
    "retrain with `streamer train`, or re-import a model fitted on the `streamer features` output"
    " of this version with `streamer model import`"
)
_PICKLE_MAGIC: Final = b"\x80"
"""First byte of a pickle (protocol 2 and later), and of an uncompressed joblib file."""


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

    @classmethod
    def for_new_model(
        cls, name: str, threshold: float, metrics: dict[str, float], training: dict[str, Any]
    ) -> ModelCard:
        """The card of a model fitted or imported now, on this version's features and
        scikit-learn; `save_model` fills its sha256 and version."""
        return cls(
            name=name,
            version="",
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            sha256="",
            sklearn_version=sklearn.__version__,
            artifact_format=ARTIFACT_FORMAT,
            features=list(FEATURE_ORDER),
            categorical_features=list(CATEGORICAL_FEATURES),
            threshold=threshold,
            metrics=metrics,
            training=training,
        )

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
    Each refusal names what is wrong and what to do about it.
    """
    card_path = card_path_for(model_path)
    data = _read_bytes(
        model_path,
        f"no model artefact at {model_path}: {_NEW_MODEL_HINT}, or point STREAMER_MODEL_PATH"
        " at an existing artefact",
        "model artefact",
    )
    card = _read_card(card_path, model_path)

    if card.artifact_format != ARTIFACT_FORMAT:
        raise ModelRefusedError(
            f"model card {card_path} names format {card.artifact_format!r}, only"
            f" {ARTIFACT_FORMAT!r} artefacts are loaded: a pickle or joblib file is converted once"
            " with `streamer model import PATH`"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != card.sha256:
        raise ModelRefusedError(
            f"model artefact {model_path} has sha256 {digest}, its card {card_path} says"
            f" {card.sha256 or '(none)'}: the file was changed after its card was written, or the"
            f" card belongs to another artefact; restore the pair as it was written, or"
            f" {_NEW_MODEL_HINT}"
        )
    if card.sklearn_version != sklearn.__version__:
        raise ModelRefusedError(
            f"model {card.version} was written with scikit-learn {card.sklearn_version}, this"
            f" process runs scikit-learn {sklearn.__version__}: install the card's version"
            f" (pip install scikit-learn=={card.sklearn_version}), or retrain with `streamer"
            f" train` / re-import the model with `streamer model import` under"
            f" {sklearn.__version__}"
        )
    if card.features != list(FEATURE_ORDER):
        raise ModelRefusedError(
            f"model {card.version} expects features that this version of streamer does not build"
            f" ({describe_feature_difference(card.features)}; this version builds"
            f" {len(FEATURE_ORDER)}: {list(FEATURE_ORDER)}): {_FEATURES_HINT}"
        )
    if card.categorical_features != list(CATEGORICAL_FEATURES):
        raise ModelRefusedError(
            f"model {card.version} expects categorical features {card.categorical_features},"
            f" this version of streamer codes {list(CATEGORICAL_FEATURES)}: {_FEATURES_HINT}"
        )

    # Anything that fails here is a file we cannot vouch for (a pickle is not a zip, so skops
    # rejects it before any byte is interpreted as code).
    try:
        untrusted = set(skops.io.get_untrusted_types(data=data))
    except Exception as exc:
        if data.startswith(_PICKLE_MAGIC):
            raise ModelRefusedError(
                f"model artefact {model_path} is a pickle (or joblib) file, which streamer never"
                " loads here (unpickling runs code the file names): convert it once with"
                " `streamer model import PATH`"
            ) from exc
        raise ModelRefusedError(
            f"model artefact {model_path} is not a valid skops file ({type(exc).__name__}:"
            f" {exc}): {_NEW_MODEL_HINT}"
        ) from exc
    unexpected = sorted(untrusted - TRUSTED_TYPES)
    if unexpected:
        raise ModelRefusedError(
            f"model artefact {model_path} contains types that are not trusted: {unexpected}."
            f" streamer loads {SUPPORTED_MODELS}; custom classes and functions (a"
            " FunctionTransformer, a lambda) cannot be loaded safely: refit without them and"
            " import again with `streamer model import`"
        )
    try:
        # Only the reviewed types the file names; the check below ties them to its family.
        estimator = skops.io.loads(data, trusted=sorted(untrusted))
    except Exception as exc:
        raise ModelRefusedError(
            f"model artefact {model_path} could not be loaded ({type(exc).__name__}: {exc}):"
            f" {_NEW_MODEL_HINT}"
        ) from exc

    try:
        needed = check_supported(estimator)
        check_fitted_binary(estimator)
    except UnsupportedModelError as exc:
        raise ModelRefusedError(f"model artefact {model_path} {exc}") from None
    spare = sorted(untrusted - needed)
    if spare:
        raise ModelRefusedError(
            f"model artefact {model_path} holds types its {describe_model(estimator)} does not"
            f" need: {spare}; it was not written by `streamer train` or `streamer model import`:"
            f" {_NEW_MODEL_HINT}"
        )
    return LoadedModel(estimator=estimator, card=card)


class UnsupportedModelError(ValueError):
    """The estimator is not a supported family, or not a fitted binary classifier over
    `FEATURE_ORDER`; the message completes "model artefact PATH ..." or "the model ..."."""


def check_supported(estimator: Any) -> frozenset[str]:
    """The trusted types `estimator` needs, if it is a supported family; else raise.

    Supported: an exact `CLASSIFIER_TYPES` class, or a `Pipeline` whose last step is one and
    whose earlier steps are preprocessing (see `PREPROCESSING_TYPES`). Raises
    `UnsupportedModelError` naming the first component that is not.
    """
    if type(estimator) is Pipeline:
        *steps, (_, final) = estimator.steps
        needed = set(_classifier_types(final))
        for _, step in steps:
            needed |= _preprocessing_types(step)
        return frozenset(needed)
    return _classifier_types(estimator)


def check_fitted_binary(estimator: Any) -> None:
    """Raise `UnsupportedModelError` unless `estimator` is fitted on `FEATURE_ORDER` for 0/1.

    Checks `n_features_in_`, `feature_names_in_` (when the model was fitted on named columns)
    and `classes_` == [0, 1], where column 1 of predict_proba is P(fraud).
    """
    n_features = getattr(estimator, "n_features_in_", None)
    if n_features is None:
        raise UnsupportedModelError(
            "is not fitted (no n_features_in_): fit it on the feature matrix first"
        )
    if n_features != len(FEATURE_ORDER):
        raise UnsupportedModelError(
            f"was fitted on {n_features} features, streamer builds {len(FEATURE_ORDER)}"
            f" ({list(FEATURE_ORDER)}): {_FEATURES_HINT}"
        )
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None and [str(name) for name in names] != list(FEATURE_ORDER):
        difference = describe_feature_difference([str(name) for name in names])
        raise UnsupportedModelError(
            f"was fitted on other feature columns ({difference}): {_FEATURES_HINT}"
        )
    classes = getattr(estimator, "classes_", None)
    if classes is None or len(classes) != 2 or [_plain(c) for c in classes] != [0, 1]:
        shown = None if classes is None else [_plain(c) for c in classes]
        raise UnsupportedModelError(
            f"predicts classes {shown}, not [0, 1]: fit it on a 0/1 label (1 = fraud), so that"
            " column 1 of predict_proba is the probability of fraud"
        )


def describe_model(estimator: Any) -> str:
    """The estimator's structure in short, e.g. "Pipeline(SimpleImputer, LogisticRegression)"."""
    if type(estimator) is Pipeline:
        return f"Pipeline({', '.join(_step_name(step) for _, step in estimator.steps)})"
    return type(estimator).__name__


def describe_feature_difference(names: Sequence[str]) -> str:
    """How `names` differ from `FEATURE_ORDER`: missing, unknown, or the first out of place."""
    parts = []
    missing = [name for name in FEATURE_ORDER if name not in names]
    unknown = [name for name in names if name not in FEATURE_ORDER]
    if missing:
        parts.append(f"missing {missing}")
    if unknown:
        parts.append(f"unknown {unknown}")
    if not parts:
        if len(names) != len(FEATURE_ORDER):
            parts.append(f"{len(names)} columns with repeats, expected {len(FEATURE_ORDER)}")
        else:
            pairs = enumerate(zip(names, FEATURE_ORDER, strict=True))
            at = next(i for i, (name, expected) in pairs if name != expected)
            parts.append(
                f"same names in another order: column {at} is {names[at]!r},"
                f" expected {FEATURE_ORDER[at]!r}"
            )
    return "; ".join(parts)


def _classifier_types(estimator: Any) -> frozenset[str]:
    needed = CLASSIFIER_TYPES.get(type(estimator))
    if needed is None:
        raise UnsupportedModelError(
            f"holds a {_step_name(estimator)} as its classifier; streamer loads {SUPPORTED_MODELS}"
        )
    if type(estimator) is HistGradientBoostingClassifier and _has_native_categories(estimator):
        raise UnsupportedModelError(
            "holds a HistGradientBoostingClassifier with native categorical features, which"
            " needs functools.partial (not trusted: it can wrap any function) to load: fit it"
            " with categorical_features=None; the category columns are already ordered codes"
        )
    return needed


def _has_native_categories(estimator: HistGradientBoostingClassifier) -> bool:
    categorical = getattr(estimator, "is_categorical_", None)
    return categorical is not None and bool(categorical.any())


def _preprocessing_types(step: Any) -> set[str]:
    if step is None or (isinstance(step, str) and step in ("passthrough", "drop")):
        return set()
    if type(step) is Pipeline:
        needed: set[str] = set()
        for _, inner in step.steps:
            needed |= _preprocessing_types(inner)
        return needed
    types = PREPROCESSING_TYPES.get(type(step))
    if types is None:
        raise UnsupportedModelError(
            f"holds a {_step_name(step)} preprocessing step; streamer loads {SUPPORTED_MODELS}"
        )
    needed = set(types)
    if type(step) is ColumnTransformer:
        for inner in _column_transformers(step):
            needed |= _preprocessing_types(inner)
    return needed


def _column_transformers(step: ColumnTransformer) -> Iterator[Any]:
    """The fitted transformers of a ColumnTransformer (its declared ones if not fitted)."""
    for _, transformer, _ in getattr(step, "transformers_", step.transformers):
        yield transformer


def _step_name(step: Any) -> str:
    return step if isinstance(step, str) else type(step).__name__


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (bool stays bool: False == 0 in the comparison)."""
    return value.item() if hasattr(value, "item") else value


def _read_bytes(path: Path, missing: str, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelRefusedError(missing) from None
    except OSError as exc:
        raise ModelRefusedError(f"cannot read {what} {path}: {exc}") from exc


def _read_card(card_path: Path, model_path: Path) -> ModelCard:
    raw = _read_bytes(
        card_path,
        f"model artefact {model_path} has no model card at {card_path}: the card is written"
        " beside the artefact by `streamer train` and `streamer model import`; copy it along"
        f" with the artefact, or {_NEW_MODEL_HINT}",
        "model card",
    )
    try:
        return ModelCard.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        raise ModelRefusedError(
            f"model card {card_path} is invalid ({describe_validation_error(exc)}): restore the"
            f" card written with the artefact, or {_NEW_MODEL_HINT}"
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
