"""`SegmentationModule`: the LightningModule that trains any network under the segx contract."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import MeanMetric

from segx.data.voc import IGNORE_INDEX, VOC_CLASSES
from segx.inference.checkpoint import CHECKPOINT_KEY
from segx.metrics import (
    MEANS,
    PER_CLASS_SCORES,
    StudyIoUNoBackground,
    StudyMeanIoU,
    confusion_matrix_metric,
    segmentation_scores,
)
from segx.training.optim import build_optimizer


class SegmentationModule(pl.LightningModule):
    """Wraps a network mapping [N,3,H,W] to logits [N,C,H,W] with a loss, an optimizer and the metrics.

    Metrics are confusion matrices accumulated over the whole epoch and reduced once at its end (see
    `segx.metrics.confusion`); the epoch's mean loss likewise. Every reduction over DDP ranks happens in the module's
    own epoch-end hooks, which every rank runs in the same order: nothing is logged with `sync_dist`, whose reduction
    Lightning starts wherever the logged values are first read (the progress bar reads them on rank 0 only).
    `run_config` (the resolved Hydra config) is stored in every checkpoint so that `evaluate.py ckpt=...` can rebuild
    the network and its data without any other file. `study_metrics` also logs the study's own Keras readings
    (`segx.metrics.study`: not mIoU) as `{train,val}/study_meaniou` and `{train,val}/study_iou_no_bg`, only to
    reproduce its curves.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        class_names: Sequence[str] = VOC_CLASSES,
        ignore_index: int = IGNORE_INDEX,
        run_config: Mapping[str, Any] | None = None,
        channels_last: bool = False,
        palette: Sequence[Sequence[int]] | None = None,
        example_size: int | None = None,
        background_index: int | None = 0,
        fscore_beta: float = 1.0,
        study_metrics: bool = False,
        compile_backend: bool | str = False,
    ) -> None:
        super().__init__()
        self.net = net
        self.compile_backend = compile_backend  # run.compile: true (inductor) or a backend's name
        self.loss = loss
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler) if scheduler is not None else None
        self.class_names = list(class_names)
        self.palette = [list(map(int, colour)) for colour in palette] if palette is not None else None
        self.ignore_index = int(ignore_index)
        self.background_index = background_index  # None: no background class, so no val/miou_no_bg
        self.fscore_beta = float(fscore_beta)
        self.run_config = dict(run_config or {})
        num_classes = len(self.class_names)
        self.train_confmat = confusion_matrix_metric(num_classes, ignore_index)
        self.val_confmat = confusion_matrix_metric(num_classes, ignore_index)
        # The epoch's loss, weighted by batch size (NaN kept: a diverged epoch must not read as fine).
        self.train_loss_mean = MeanMetric(nan_strategy="disable")
        self.val_loss_mean = MeanMetric(nan_strategy="disable")
        self.val_confusion_matrix: torch.Tensor | None = None
        self.study_metrics = bool(study_metrics)
        if self.study_metrics:  # the study's Keras readings of IoU, only to reproduce its curves
            self.train_study_meaniou = StudyMeanIoU(num_classes, ignore_index)
            self.val_study_meaniou = StudyMeanIoU(num_classes, ignore_index)
            if background_index is not None:
                self.train_study_iou_no_bg = StudyIoUNoBackground(background_index, ignore_index)
                self.val_study_iou_no_bg = StudyIoUNoBackground(background_index, ignore_index)
        self.channels_last = bool(channels_last)
        if example_size:  # one image: Lightning's model summary then shows in/out sizes and FLOPs per image
            self.example_input_array = torch.zeros(1, 3, int(example_size), int(example_size))

    def configure_model(self) -> None:
        # Called in every process that trains. nn.Module's pickling drops a compiled call, so a rank that
        # ddp_spawn started would otherwise train the plain network while the log says "compiled".
        if self.compile_backend and not self.compiled:
            backend = self.compile_backend
            self.net.compile(**({"backend": backend} if isinstance(backend, str) else {}))

    @property
    def compiled(self) -> bool:
        """Whether this process' network runs through torch.compile."""
        return getattr(self.net, "_compiled_call_impl", None) is not None

    def setup(self, stage: str) -> None:
        # Epoch scores come from confusion matrices torchmetrics already summed over the DDP ranks, so every
        # rank logs the same value: Lightning's advice to sync them (one warning per class) does not apply.
        synced = (rf"(train|val)(/loss|/acc|/miou|/miou_no_bg|/m\w+|/pixels|/lr|/study_meaniou|/study_iou_no_bg"
                  rf"|/({'|'.join(PER_CLASS_SCORES)})/.+|_miou)")
        warnings.filterwarnings("ignore", message=rf".*self\.log\('{synced}',.*sync_dist")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # Lightning's own code

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # batches arrive NCHW (normalising is faster so on the CPU)
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, masks = batch
        logits = self(images)
        loss = self.loss(logits, masks)
        confmat = self.train_confmat if stage == "train" else self.val_confmat
        confmat.update(logits.detach().argmax(1), masks)
        if self.study_metrics:
            for metric in self._study_metrics(stage).values():
                metric.update(logits.detach(), masks)
        (self.train_loss_mean if stage == "train" else self.val_loss_mean).update(loss.detach(),
                                                                                 weight=images.shape[0])
        return loss

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.log("loss", loss, prog_bar=True, logger=False)  # the live per-batch value in the progress bar
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def _study_metrics(self, stage: str) -> dict[str, StudyMeanIoU | StudyIoUNoBackground]:
        """The study's metrics of `stage` by their logged name (none unless `study_metrics`)."""
        if not self.study_metrics:
            return {}
        names = ("study_meaniou", "study_iou_no_bg") if self.background_index is not None else ("study_meaniou",)
        return {f"{stage}/{name}": getattr(self, f"{stage}_{name}") for name in names}

    def _log_scores(self, stage: str) -> None:
        """The epoch's scores, each reduced over the DDP ranks here (every rank, same order), then logged as the
        plain values they are."""
        confmat = self.train_confmat if stage == "train" else self.val_confmat
        counts = confmat.compute()
        scores = segmentation_scores(counts, self.class_names, self.background_index, self.fscore_beta)
        confmat.reset()
        mean_loss = self.train_loss_mean if stage == "train" else self.val_loss_mean
        loss = mean_loss.compute()
        mean_loss.reset()
        if stage == "val":  # the epoch's whole val confusion matrix, for metrics.json (rows: ground truth)
            self.val_confusion_matrix = counts.detach().long().cpu()
        metrics = {f"{stage}/loss": loss, f"{stage}/acc": scores["pixel_acc"], f"{stage}/miou": scores["miou"]}
        if stage == "val":
            if scores["miou_no_bg"] is not None:
                metrics["val/miou_no_bg"] = scores["miou_no_bg"]
            # Labelled pixels scored (over all DDP ranks): every val pixel once, none padded in twice.
            self.log("val/pixels", float(scores["pixels"]), logger=False)
            metrics.update({f"val/{mean}": scores[mean] for mean in MEANS if scores[mean] == scores[mean]})
            # A class whose score is undefined (absent from both prediction and ground truth, for IoU) is not logged.
            for score in PER_CLASS_SCORES:
                metrics.update({f"val/{score}/{k}": v for k, v in scores[f"per_class_{score}"].items()
                                if v is not None})
        for name, metric in self._study_metrics(stage).items():  # computed over the epoch (summed over DDP ranks)
            metrics[name] = metric.compute()
            metric.reset()
        self.log_dict(metrics, prog_bar=False)
        self.log(f"{stage}_miou", scores["miou"], prog_bar=True, logger=False)

    def on_train_epoch_end(self) -> None:
        self._log_scores("train")
        optimizer = self.optimizers()
        if not isinstance(optimizer, list):  # the decayed learning rate at the end of the epoch
            self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def configure_optimizers(self) -> dict[str, Any]:
        steps = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        total_steps = int(steps) if math.isfinite(steps) else 0  # 0: unknown (no max_epochs nor max_steps)
        optimizer, scheduler = build_optimizer(self.parameters(), self.optimizer_cfg, self.scheduler_cfg, total_steps)
        # Keras applied `decay` per batch, so every schedule steps every batch, not every epoch.
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {"format": 1, "config": self.run_config, "class_names": self.class_names,
                                      "ignore_index": self.ignore_index, "background_index": self.background_index}
        if self.palette is not None:  # predict and export draw with the dataset's colours, without its files
            checkpoint[CHECKPOINT_KEY]["palette"] = self.palette
