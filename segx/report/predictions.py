"""Example predictions from a run's best checkpoint, rebuilt as `segx.inference.evaluate` does (model and data config
from the checkpoint), for the report's image | ground truth | prediction figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from segx.core.errors import SegxError


@dataclass
class Examples:
    """Val images spread over the split (uint8 [N,3,S,S]), their masks and the network's predictions ([N,S,S])."""

    images: torch.Tensor
    masks: torch.Tensor
    preds: torch.Tensor
    ids: list[str]
    class_names: list[str]
    epoch: int | None
    palette: Any = None  # uint8 [256, 3]: the dataset's colours


@torch.inference_mode()
def predict_examples(checkpoint_path: str | Path, count: int = 4) -> Examples:
    """Predict `count` images spread over the checkpoint's val split on the CPU (the keep_ratio padding blanked).
    Raises SegxError (or the data module's own error) when the checkpoint or the data cannot be read; nothing is
    downloaded."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from segx.inference.checkpoint import checkpoint_classes, load_checkpoint, network_from_checkpoint, run_config
    from segx.inference.predictor import Predictor
    from segx.inference.visualize import blank_padding, example_indices

    checkpoint = load_checkpoint(checkpoint_path)
    config = run_config(checkpoint)
    root = Path(str(config.data.get("root", ""))).expanduser()
    if not root.is_dir():
        raise SegxError(f"the run's data.root={root} is not a folder on this machine")
    # Never a download for a figure; only sources that can download have the key.
    data_cfg = OmegaConf.merge(config.data, {"download": False}) if "download" in config.data else config.data
    datamodule = instantiate(data_cfg)
    split = datamodule.load_split(datamodule.val_split)
    chosen = example_indices(count, len(split))
    images, masks = split.images[chosen], split.masks[chosen]
    predictor = Predictor.from_run(network_from_checkpoint(checkpoint), config, torch.device("cpu"))
    preds = blank_padding(predictor.logits(images).argmax(1), split.original_sizes[chosen], datamodule.resize,
                          datamodule.ignore_index)
    epoch = checkpoint.get("epoch")
    return Examples(images=images, masks=masks, preds=preds, ids=[split.ids[i] for i in chosen.tolist()],
                    class_names=list(datamodule.class_names), epoch=int(epoch) if epoch is not None else None,
                    palette=checkpoint_classes(checkpoint)[1])
