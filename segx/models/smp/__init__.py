"""segmentation-models-pytorch behind segx's network contract: the wrapper and its pretrained-weights fetcher."""

from __future__ import annotations

from segx.models.smp.weights import ModelWeightsUnavailableError, fetch_pretrained
from segx.models.smp.wrapper import ARCHITECTURES, SMPModel

__all__ = ["ARCHITECTURES", "ModelWeightsUnavailableError", "SMPModel", "fetch_pretrained"]
