"""`train`: one training run from a composed config, leaving a complete run directory behind."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar

from segx.callbacks import RunSummary
from segx.losses import build_loss
from segx.models import parameter_counts
from segx.module import SegmentationModule
from segx.runfiles import write_json_atomic

log = logging.getLogger(__name__)


def _flat_choices(cfg: DictConfig) -> dict[str, Any]:
    """The knobs a sweep turns, flattened for TensorBoard's hparams tab."""
    flat: dict[str, Any] = {"seed": cfg.seed}
    for group in ("model", "optimizer", "loss", "data"):
        node = OmegaConf.to_container(cfg[group], resolve=True)
        for key, value in node.items():
            if isinstance(value, str | int | float | bool):
                flat[f"{group}.{key}"] = value
            elif isinstance(value, list) and len(value) <= 8:  # widths and the like; class names are skipped
                flat[f"{group}.{key}"] = str(value)
    return flat


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[pl.Callback]:
    """Instantiate `cfg.callbacks`; checkpoints go to `<run dir>/checkpoints` unless a dirpath is set.

    `trainer.enable_progress_bar=false` drops the configured progress bar instead of making Lightning
    refuse the combination.
    """
    callbacks = []
    show_progress = cfg.trainer.get("enable_progress_bar", True) is not False
    for node in (cfg.get("callbacks") or {}).values():
        if node is None:
            continue
        callback = instantiate(node)
        if isinstance(callback, ProgressBar) and not show_progress:
            continue
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(run_dir / "checkpoints")
        callbacks.append(callback)
    return callbacks


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def _quiet_lightning() -> None:
    """Drop Lightning's advertising tips and a deprecation warning it raises from its own code."""
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_a_tip)  # ignored if already there
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Fit the configured model and write `metrics.json`; returns the best `val/miou` (for sweepers).

    `run_dir` receives `checkpoints/`, the logger's files and `metrics.json`.
    """
    run_dir = Path(run_dir)
    _quiet_lightning()
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    loss = build_loss(cfg.loss, class_frequencies=datamodule.class_frequencies)
    module = SegmentationModule(
        net, loss, optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        class_names=datamodule.class_names, run_config=OmegaConf.to_container(cfg, resolve=True),
    )
    counts = parameter_counts(net)
    log.info("Model %s: %s parameters (%s trainable)", cfg.model._target_, f"{counts['total']:,}",
             f"{counts['trainable']:,}")

    logger = instantiate(cfg.logger, save_dir=str(run_dir)) if cfg.get("logger") else False
    summary = RunSummary(run_dir / "metrics.json", parameters=counts, hparams=_flat_choices(cfg))
    callbacks = [*build_callbacks(cfg, run_dir), summary]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if not (run_dir / "metrics.json").exists():  # e.g. resumed past max_epochs: nothing trained
        write_json_atomic(run_dir / "metrics.json", summary.summary(trainer))

    best = summary.best().get("val/miou")
    log.info("Run directory: %s (metrics.json, checkpoints/, %s)", run_dir,
             getattr(logger, "name", None) or "no logger")
    return float(best) if best is not None else float("nan")
