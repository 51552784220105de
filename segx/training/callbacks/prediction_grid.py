"""Logs image | ground truth | prediction for a few val images to TensorBoard each validation."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from segx.inference.visualize import blank_padding, example_indices, prediction_grid

log = logging.getLogger(__name__)



class PredictionGridLogger(pl.Callback):
    """Each validation epoch, logs image | ground truth | prediction for `num_images` val images spread over the
    split (`example_indices`), the keep_ratio padding blanked.

    The same images every epoch, so the TensorBoard slider shows the network learning them.
    """

    def __init__(self, num_images: int = 4, tag: str = "val/predictions") -> None:
        self.num_images = int(num_images)
        self.tag = tag

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.num_images <= 0 or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        datamodule = trainer.datamodule
        if not loggers or datamodule is None:
            return
        split = datamodule.load_split(datamodule.val_split)
        chosen = example_indices(self.num_images, len(split))
        images = split.images[chosen].to(pl_module.device)
        masks = split.masks[chosen]
        dtype = next(pl_module.parameters()).dtype  # bf16-true precision keeps bf16 weights
        with torch.no_grad():
            preds = pl_module(datamodule.normalize(images).to(dtype)).argmax(1).cpu()
        preds = blank_padding(preds, split.original_sizes[chosen], datamodule.resize, datamodule.ignore_index)
        grid = prediction_grid(images.float() / 255, masks, preds, datamodule.palette)
        for logger in loggers:
            logger.experiment.add_image(self.tag, grid, global_step=trainer.global_step)


