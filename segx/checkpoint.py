"""Loading segx checkpoints safely: tensors and plain containers only (`weights_only`), never code."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.parsing import AttributeDict
from torch import nn

from segx.errors import SegxError
from segx.module import CHECKPOINT_KEY

# Lightning stores the type of `hparams` next to them; allowing that one harmless dict subclass
# keeps `weights_only=True` (no arbitrary unpickling) usable on Lightning checkpoints.
_SAFE_GLOBALS = [AttributeDict]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `train.py` with `weights_only=True` semantics."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SegxError(
            f"Checkpoint ckpt={path} does not exist. Pass the path of a best*.ckpt or last.ckpt file from a "
            "run directory's checkpoints/ folder."
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise SegxError(
            f"Checkpoint ckpt={path} could not be read safely ({str(error).splitlines()[0]}). It is truncated, "
            "not a PyTorch checkpoint, or holds Python objects other than tensors and plain containers; "
            "use a checkpoint written by segx's train.py."
        ) from error
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise SegxError(
            f"Checkpoint ckpt={path} was not written by segx's train.py (it has no '{CHECKPOINT_KEY}' entry with "
            "the run's config), so the model cannot be rebuilt from it."
        )
    return checkpoint


def run_config(checkpoint: dict[str, Any]) -> DictConfig:
    """The resolved Hydra config of the run that wrote the checkpoint."""
    return OmegaConf.create(checkpoint[CHECKPOINT_KEY]["config"])


def network_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network from the stored model config and load its weights (strictly)."""
    model_cfg = run_config(checkpoint).model
    if model_cfg.get("encoder_weights") is not None:
        # The checkpoint holds every weight: fetching the pretrained encoder again would only fail offline.
        model_cfg.encoder_weights = None
    net = instantiate(model_cfg)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    return net
