"""The fraud model: verified artefacts on disk (`artifact`), batch scoring (`scorer`), training.

`train` is not imported here: it pulls in the synthetic world and the metrics, which the scoring
process does not need.
"""

from streamer.model.artifact import LoadedModel, ModelCard, card_path_for, load_model, save_model
from streamer.model.scorer import Scorer

__all__ = ["LoadedModel", "ModelCard", "Scorer", "card_path_for", "load_model", "save_model"]
