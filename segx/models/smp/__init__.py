"""segmentation-models-pytorch behind segx's network contract: the wrapper and its pretrained-weights fetcher.

The wrapper (and segmentation-models-pytorch with timm, over half a second to import) loads on first use, so a
run of segx's own networks never pays for it.
"""

from __future__ import annotations

from typing import Any

from segx.models.smp.weights import ModelWeightsUnavailableError, fetch_pretrained

__all__ = ["ARCHITECTURES", "ModelWeightsUnavailableError", "SMPModel", "fetch_pretrained"]


def __getattr__(name: str) -> Any:
    if name in ("ARCHITECTURES", "SMPModel"):  # `_target_: segx.models.smp.SMPModel` resolves through here
        from segx.models.smp import wrapper

        return getattr(wrapper, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
