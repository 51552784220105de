"""Loading segx checkpoints safely: tensors and plain containers only (`weights_only`), never code."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from segx.core.errors import SegxError, first_line
from segx.models import build_network
from segx.tracking.registry import checkpoint_from_tracking, is_tracking_reference

CHECKPOINT_KEY = "segx"  # the entry of a Lightning checkpoint holding the run config and class names

#: `model._target_` names that older checkpoints store, and where those classes live now.
LEGACY_TARGETS = {"segx.models.smp_model.SMPModel": "segx.models.smp.SMPModel"}

# Lightning stores the type of `hparams` next to them, a dict subclass; read back as a plain dict it keeps
# `weights_only=True` (no arbitrary unpickling) usable on Lightning checkpoints, and reading a checkpoint (evaluate,
# predict, export) does not have to import Lightning.
_SAFE_GLOBALS = [(dict, "pytorch_lightning.utilities.parsing.AttributeDict")]


# torch.load's message when the weights-only unpickler stops; it goes on to advise `weights_only=False`.
_WEIGHTS_ONLY_REFUSAL = "Weights only load failed"


def _unreadable(path: Path, reason: str) -> SegxError:
    return SegxError(
        f"Checkpoint ckpt={path} could not be read safely ({reason}). It is truncated, "
        "not a PyTorch checkpoint, or holds Python objects other than tensors and plain containers; "
        "use a checkpoint written by segx's train.py."
    )


def _weights_only_refusal(path: Path, message: str) -> SegxError:
    """Our own words for torch's refusal, whose advice is to load the file with code execution allowed."""
    # torch names the global as "Unsupported global: GLOBAL x.y", or for a blocked module (os, posix,
    # subprocess, ...) as "unsupported GLOBAL posix.system whose module posix is blocked".
    refused = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", message)
    if refused is None:  # not a pickle torch writes (an image, a plain pickle): say what stopped the reader
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
        return _unreadable(path, detail.group(1).strip() if detail else "not a PyTorch checkpoint")
    return SegxError(
        f"Checkpoint ckpt={path} holds Python objects other than tensors and plain containers (e.g. "
        f"{refused.group(1)}), so loading it could run code; segx refuses to load it. Use a checkpoint written "
        "by segx's train.py."
    )


def checkpoint_path(ckpt: str | Path) -> Path:
    """The local file of `ckpt`: a path, or an MLflow URI (`models:/<name>/<version>`, `runs:/<run id>/checkpoints`)
    of a checkpoint `logger=mlflow` logged, fetched from $MLFLOW_TRACKING_URI or ./mlflow.db."""
    if isinstance(ckpt, str) and is_tracking_reference(ckpt):
        return checkpoint_from_tracking(ckpt)
    return Path(ckpt).expanduser()


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by `train.py` with `weights_only=True` semantics (`path` as `checkpoint_path`
    takes it)."""
    path = checkpoint_path(path)
    if not path.is_file():
        raise SegxError(
            f"Checkpoint ckpt={path} does not exist. Pass the path of a best*.ckpt or last.ckpt file from a "
            "run directory's checkpoints/ folder."
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # A file that is no torch checkpoint (an image, a plain pickle) also draws a pickle-protocol warning.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if _WEIGHTS_ONLY_REFUSAL in str(error):
            raise _weights_only_refusal(path, str(error)) from None  # no chained trace repeating torch's advice
        raise _unreadable(path, first_line(error)) from error
    except KeyError as error:  # what torch's zip reader raises for some plain text files
        raise _unreadable(path, "not a PyTorch checkpoint") from error
    except (RuntimeError, EOFError, OSError) as error:
        raise _unreadable(path, first_line(error)) from error
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise SegxError(
            f"Checkpoint ckpt={path} was not written by segx's train.py (it has no '{CHECKPOINT_KEY}' entry with "
            "the run's config), so the model cannot be rebuilt from it."
        )
    return checkpoint


def run_config(checkpoint: dict[str, Any]) -> DictConfig:
    """The resolved Hydra config of the run that wrote the checkpoint, its model's `_target_` renamed where the
    class has moved since (`LEGACY_TARGETS`)."""
    config = OmegaConf.create(checkpoint[CHECKPOINT_KEY]["config"])
    target = OmegaConf.select(config, "model._target_")
    if target in LEGACY_TARGETS:
        config.model._target_ = LEGACY_TARGETS[target]
    return config


def checkpoint_classes(checkpoint: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """The class names and uint8 [256, 3] palette the run trained with (VOC's for checkpoints that stored none)."""
    from segx.data.voc_classes import VOC_CLASSES, VOC_PALETTE

    record = checkpoint[CHECKPOINT_KEY]
    names = record.get("class_names") or OmegaConf.select(run_config(checkpoint), "data.class_names") or VOC_CLASSES
    palette = np.asarray(record["palette"], dtype=np.uint8) if record.get("palette") else VOC_PALETTE
    return [str(n) for n in names], palette


def network_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network from the stored model config and load its weights (strictly)."""
    model_cfg = run_config(checkpoint).model
    if model_cfg.get("encoder_weights") is not None:
        # The checkpoint holds every weight: fetching the pretrained encoder again would only fail offline.
        model_cfg.encoder_weights = None
    net = build_network(model_cfg)  # callers pick the memory format (segx.inference.predictor)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    net.load_state_dict(state, strict=True)
    return net
