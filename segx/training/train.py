"""`train`: one training run from a composed config, leaving a complete run directory behind."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ModelSummary, ProgressBar

from segx.core.errors import ConfigError
from segx.core.files import write_json_atomic
from segx.core.job_console import ON_CONSOLE
from segx.data.census import census_record, census_table
from segx.data.datamodule import gpu_share
from segx.inference.predictor import Predictor, inference_precision
from segx.inference.timing import time_prediction
from segx.models import (
    LEGACY_MODEL_KEYS,
    apply_network_options,
    build_network,
    check_input_size,
    parameter_counts,
    run_options,
)
from segx.models.memory_format import MemoryFormat
from segx.models.smp import fetch_pretrained
from segx.runs.job import JobInfo
from segx.runs.overrides import override_settings, varying_keys
from segx.runs.record import JobRecord, best_value, read_record
from segx.tracking.run import TrackedRun, start_tracking
from segx.tracking.settings import is_mlflow_node, logger_nodes
from segx.training.callbacks import RunSummary
from segx.training.callbacks.checkpoint_on_interrupt import CheckpointOnInterrupt
from segx.training.callbacks.collective_timeout import CollectiveTimeout
from segx.training.callbacks.end_with_job import EndWithJob
from segx.training.callbacks.exact_resume import ExactResume
from segx.training.callbacks.run_summary import EpochListener
from segx.training.checkpoint_io import AtomicCheckpointIO
from segx.training.collectives import CollectiveTimeoutError, collective_timeout_message, is_collective_timeout
from segx.training.losses import build_loss
from segx.training.module import SegmentationModule
from segx.training.resume_check import check_resume
from segx.training.runtime import Runtime, choose_run_memory_format, resolve_runtime
from segx.training.tensorboard import shown_hparams

log = logging.getLogger(__name__)


#: The numbers TensorBoard's HParams tab shows for every run beside its group choices and overridden keys.
HEADLINE_KEYS = ("optimizer.lr", "optimizer.decay", "data.batch_size", "data.image_size", "trainer.max_epochs", "seed")


def _group_choices() -> dict[str, str]:
    """The config groups Hydra chose for this run (model → unet, ...), none of Hydra's own; {} outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {str(k): str(v) for k, v in choices.items() if v is not None and not str(k).startswith("hydra")}


def _hparams(cfg: DictConfig, overrides: list[str], swept: Sequence[str] = ()) -> dict[str, Any]:
    """What TensorBoard's HParams tab compares a sweep by: the swept keys, the group choices, the headline numbers
    and every key the command line set, each with its resolved value; a few columns, not every config key."""
    choices = _group_choices()
    hparams: dict[str, Any] = {key: choices[key] for key in swept if key in choices}
    hparams.update(choices)
    typed = override_settings(overrides)
    for key in dict.fromkeys([*swept, *HEADLINE_KEYS, *typed]):
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or (value is None and key in typed):  # a group's choice (model=unet)
            value = hparams.get(key, typed.get(key))
        elif isinstance(value, ListConfig):
            value = str(OmegaConf.to_container(value, resolve=True))
        if value is not None:
            hparams[key] = value
    return hparams


def build_logger(cfg: DictConfig, job: JobInfo, record: JobRecord, tracked: TrackedRun | None = None) -> Any:
    """The configured logger(s) (`logger=many`: a list), writing into the run directory. A sweep job's TensorBoard
    files go to `<sweep dir>/<run name>` instead (e.g. `multirun/.../optimizer=sgd,seed=1`), so `tensorboard --logdir
    <sweep dir>` names every run by the overrides it varies, not `0/tensorboard`; `metrics.json` records where
    (`tensorboard_dir`). An MLflow logger writes into the run `tracked` opened."""
    loggers = []
    for node in logger_nodes(cfg.get("logger")):
        target = str(node._target_)
        if is_mlflow_node(node):
            if tracked is None:  # another rank of a DDP run: rank zero logs
                continue
            loggers.append(instantiate(node, **tracked.logger_arguments()))
        elif job.multirun and target.endswith("TensorBoardLogger"):
            logger = instantiate(node, save_dir=str(job.sweep_dir), name=job.run_name(), version="")
            record.fields["tensorboard_dir"] = str(Path(logger.log_dir))
            loggers.append(logger)
        else:
            loggers.append(instantiate(node, save_dir=str(job.run_dir)))
    if not loggers:
        return False
    return loggers[0] if len(loggers) == 1 else loggers


def _describe_logger(logger: Any) -> str:
    if type(logger).__name__.lower().endswith("mlflowlogger"):  # its `name` is the experiment's id
        return f"MLflow run {logger.run_id}"
    return str(getattr(logger, "name", None) or type(logger).__name__)


def build_callbacks(cfg: DictConfig, run_dir: Path, show_progress: bool = True) -> list[pl.Callback]:
    """Instantiate `cfg.callbacks`; checkpoints go to `<run dir>/checkpoints` unless a dirpath is set.

    Without `show_progress` (`trainer.enable_progress_bar=false`, or a job in a worker beside others,
    whose live bars would interleave) the configured progress bar is dropped instead of making
    Lightning refuse the combination.
    """
    callbacks = []
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


def _route_lightning_logs() -> None:
    """Lightning's messages go through the job's logging (so into its log file, with the job's prefix),
    without its advertising tips and a deprecation warning it raises from its own code."""
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in ("pytorch_lightning", "lightning_fabric"):
        lightning_log = logging.getLogger(name)
        if root_has_handlers:  # Lightning adds its own stream handler when imported before logging is set up
            for handler in list(lightning_log.handlers):
                if type(handler) is logging.StreamHandler:
                    lightning_log.removeHandler(handler)
            lightning_log.propagate = True
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_a_tip)  # ignored if already there
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


MONITORS = ("val/miou", "val/miou_no_bg", "val/acc", "val/mdice", "val/mfscore", "val/macc", "val/mprecision",
            "val/mrecall")  # higher is better for each


def _check_epochs(trainer_cfg: DictConfig) -> None:
    epochs = trainer_cfg.get("max_epochs")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs == 0 or epochs < -1):
        raise ConfigError(f"trainer.max_epochs={epochs} trains nothing; give a whole number of epochs from 1 up "
                          "(the study used 25), or -1 to train until stopped.")


def _seed(cfg: DictConfig) -> int:
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed={seed} must be a whole number from 0 to {2**32 - 1} (e.g. seed=1, or seed=1,2,3 "
                          "with -m for several runs).")
    return seed


def _absolute_data_paths(cfg: DictConfig) -> None:
    """`data.root`, `data.cache_dir` and `data.sbd_root` as absolute paths, so the checkpoint's config finds the data
    from any folder (`data.root=data` is relative to where training was launched)."""
    with open_dict(cfg):
        for key in ("root", "cache_dir", "sbd_root"):
            if isinstance(cfg.data.get(key), str):
                cfg.data[key] = str(Path(cfg.data[key]).expanduser().absolute())


def chained_trials(cfg: DictConfig) -> dict[str, int] | None:
    """`chained_trials` as metrics.json records it ({"trials", "epochs_per_trial"}), or None for one trial."""
    trials = cfg.get("chained_trials")
    if trials is None:
        return None
    epochs = cfg.trainer.get("max_epochs")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"chained_trials={trials!r} must be null (one run, one trial) or a whole number of trials "
                          "from 1 up (the study chained 3).")
    if not isinstance(epochs, int) or epochs < 1 or epochs % trials:
        raise ConfigError(f"chained_trials={trials} splits the run into {trials} windows of equal length, but "
                          f"trainer.max_epochs={epochs} is not a multiple of {trials}; set trainer.max_epochs to "
                          f"{trials} × the epochs of one trial (the study: 3 × 25 = 75).")
    return {"trials": trials, "epochs_per_trial": epochs // trials}


def _monitor(cfg: DictConfig) -> str:
    monitor = str(cfg.get("monitor", "val/miou"))
    if monitor not in MONITORS:
        raise ConfigError(f"monitor={monitor} cannot pick the best epoch; choose one of {', '.join(MONITORS)}.")
    return monitor


def _time_prediction(cfg: DictConfig, net: torch.nn.Module, datamodule: Any, runtime: Runtime,
                     memory_format: MemoryFormat, trained_on: torch.device) -> dict:
    """The study's timing protocol on the trained network (`timing.predict=true`), on the GPU it trained on."""
    timing = cfg.timing
    images = datamodule.load_split(datamodule.val_split).images
    if timing.get("max_images"):
        images = images[: int(timing.max_images)]
    device = trained_on if runtime.accelerator == "cuda" and trained_on.type == "cuda" else torch.device("cpu")
    precision = inference_precision(runtime.precision, device, timing.get("precision", "auto"))
    log.info("Timing prediction of %d val images: %d warm-up + %d timed passes on %s in %s", len(images),
             timing.warmup, timing.passes, device, precision)
    predictor = Predictor(net, device, precision, channels_last=memory_format.channels_last,
                          normalize=datamodule.normalizer, batch_size=int(timing.batch_size))
    result = {**time_prediction(predictor, images, passes=int(timing.passes), warmup=int(timing.warmup)),
              "predict_precision": precision}
    log.info("Predicting %d val images took %.3f s (mean of %d passes), %.0f images/s", result["predict_images"],
             result["predict_val_seconds"], timing.passes, result["predict_images_per_second"])
    return result


def _refuse_run_options_in_model(model_cfg: DictConfig) -> None:
    """`+model.channels_last=...` (the place these options had before the `run` node) would be silently dropped."""
    misplaced = [key for key in LEGACY_MODEL_KEYS if key in model_cfg]
    if misplaced:
        raise ConfigError(
            f"model.{misplaced[0]} is not an argument of the network: the model group holds constructor arguments "
            f"only. Set run.{misplaced[0]} instead (conf/train.yaml's run node), e.g. run.{misplaced[0]}="
            f"{str(model_cfg[misplaced[0]]).lower()}."
        )


def _take_the_datasets_classes(model_cfg: DictConfig, num_classes: int) -> None:
    """A model whose `num_classes` is null (a dataset that names its classes in a file) gets the dataset's count;
    one that asks for another count than the dataset has is refused."""
    if "num_classes" not in model_cfg:
        return
    if model_cfg.num_classes is None:
        with open_dict(model_cfg):
            model_cfg.num_classes = num_classes
    elif int(model_cfg.num_classes) != num_classes:
        raise ConfigError(f"model.num_classes={model_cfg.num_classes} but the dataset has {num_classes} classes; "
                          "drop the override (the model takes the dataset's count) or fix data.class_names.")


def logging_interval(trainer_cfg: DictConfig, train_images: int, batch_size: int) -> int | None:
    """`trainer.log_every_n_steps` lowered to the batches of one epoch (Lightning warns, and logs no train/* curve
    within an epoch, when an epoch is shorter); None when the configured interval already fits."""
    configured = trainer_cfg.get("log_every_n_steps")
    if not isinstance(configured, int) or configured < 1:
        return None
    batches = math.ceil(train_images / max(1, batch_size))
    limit = trainer_cfg.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
        batches = min(batches, limit)
    elif isinstance(limit, float) and 0 < limit < 1:
        batches = max(1, int(batches * limit))
    devices = trainer_cfg.get("devices")
    if isinstance(devices, int) and devices > 1:  # under DDP each rank steps through its shard
        batches = math.ceil(batches / devices)
    return max(1, batches) if batches < configured else None


def train(cfg: DictConfig, job: JobInfo, record: JobRecord | None = None) -> float:
    """Fit the configured model and write `metrics.json`; returns the best value of `monitor` (for sweepers).

    `job.run_dir` receives `checkpoints/`, the logger's files and `metrics.json`; `record` (status and
    provenance) is kept in `metrics.json` with every epoch.
    """
    run_dir = job.run_dir
    record = record or JobRecord(job)
    _absolute_data_paths(cfg)
    _route_lightning_logs()
    tracked = start_tracking(cfg, job, record)  # first, so a job failing on its config is filed there too
    monitor = _monitor(cfg)
    _check_epochs(cfg.trainer)
    chained = chained_trials(cfg)
    if chained is not None:
        record.fields["chained_trials"] = chained
        log.info("Chained trials: %d × %d epochs of one model and optimizer, each window scored by its maximum "
                 "(the study's protocol)", chained["trials"], chained["epochs_per_trial"])
    runtime = resolve_runtime(cfg.trainer, in_sweep=job.multirun,
                              collective_timeout_s=(cfg.get("distributed") or {}).get("collective_timeout_s", 300))
    record.start(**runtime.record())
    share = gpu_share()
    if share < 1:  # e.g. hydra.launcher.ray.remote.num_gpus=0.5: data.on_device=auto budgets that share
        record.fields["gpu_share"] = share
    if tracked is not None:
        tracked.note_runtime(record.fields)
    log.info("Job %s · launcher %s · host %s · %s", "-" if job.num is None else job.num, job.launcher,
             record.fields["host"], " · ".join(f"{k} {v}" for k, v in runtime.record().items()), extra=ON_CONSOLE)

    pl.seed_everything(_seed(cfg), workers=True, verbose=False)
    _refuse_run_options_in_model(cfg.model)
    if cfg.get("ckpt_path"):  # another network, classes or size is refused before anything is built
        changed = check_resume(cfg.ckpt_path, cfg)
        record.note(resumed_from=str(cfg.ckpt_path), resume_changes=changed)
        if changed:
            log.info("Resuming %s with changed settings: %s", cfg.ckpt_path,
                     ", ".join(f"{key} {old} → {new}" for key, (old, new) in changed.items()))
    options = run_options(cfg)
    torch.set_flush_denormal(options["flush_denormal"])  # CPU only; a no-op where unsupported
    # A model without a class count takes the dataset's (constructing the data module reads no data yet); else the
    # network's size check comes first, so an image size it cannot take is named as its mistake.
    datamodule = instantiate(cfg.data) if cfg.model.get("num_classes", 0) is None else None
    if datamodule is not None:
        _take_the_datasets_classes(cfg.model, datamodule.num_classes)
    fetch_pretrained(cfg.model)  # the one download, on rank 0: the constructor never downloads
    net = build_network(cfg.model)
    image_size = int(cfg.data.image_size)
    flops = check_input_size(net, image_size, f"model {cfg.model._target_}")  # before any data is read
    memory_format = choose_run_memory_format(options["channels_last"], net, runtime, cfg.trainer,
                                             int(cfg.data.batch_size), image_size)
    net = apply_network_options(net, {**options, "channels_last": memory_format.channels_last})
    if datamodule is None:
        datamodule = instantiate(cfg.data)
        _take_the_datasets_classes(cfg.model, datamodule.num_classes)
    if monitor == "val/miou_no_bg" and datamodule.background_index is None:
        raise ConfigError("monitor=val/miou_no_bg needs a background class, but this dataset has none "
                          "(data.background_index=null); monitor val/miou instead, or set data.background_index.")
    # The label census, before the loss weighs the classes by it: shown and recorded first, so a refusal below
    # (labels read the wrong way) has the table above it and in metrics.json.
    censuses = datamodule.label_censuses()
    record.fields["label_census"] = census_record(censuses)
    record.fields["mask_readings"] = {census.split: census.readings for census in censuses}
    if datamodule.source.held_out is not None:  # data.val_fraction: which images validate this run
        record.fields["val_held_out"] = datamodule.source.held_out
    log.info("Label census (pixels of the mask files at their own size, after data.label_map):\n%s",
             "\n".join(census_table(censuses)))
    datamodule.check_labels(censuses)
    loss = build_loss(cfg.loss, class_frequencies=datamodule.class_frequencies)
    module = SegmentationModule(
        net, loss, optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        class_names=datamodule.class_names, run_config=OmegaConf.to_container(cfg, resolve=True),
        palette=datamodule.palette.tolist(), ignore_index=datamodule.ignore_index,
        background_index=datamodule.background_index, fscore_beta=float(cfg.get("fscore_beta", 1.0)),
        channels_last=memory_format.channels_last, example_size=None if options["compile"] else image_size,
        study_metrics=bool((cfg.get("protocol") or {}).get("study_metrics", False)),
        compile_backend=options["compile"],
    )
    counts = parameter_counts(net)
    record.fields["forward_gflops_per_image"] = round(flops / 1e9, 3)
    record.fields["memory_format"] = memory_format.describe()
    log.info("Model %s: %s parameters (%s trainable), %.2f GFLOPs per %d×%d image forward, %s%s",
             cfg.model._target_, f"{counts['total']:,}", f"{counts['trainable']:,}", flops / 1e9, image_size,
             image_size, memory_format.describe(), ", compiled" if options["compile"] else "")

    logger = build_logger(cfg, job, record, tracked)
    swept = varying_keys(job.sweep_dir) if job.multirun and job.sweep_dir is not None else []
    hparams = _hparams(cfg, job.overrides, swept)
    show_progress = cfg.trainer.get("enable_progress_bar", True) is not False and not job.in_worker
    configured = build_callbacks(cfg, run_dir, show_progress)
    if not logger and any(isinstance(c, LearningRateMonitor) for c in configured):
        raise ConfigError("callbacks.lr_monitor logs the learning rate to the logger, but logger=none; choose a logger "
                          "(logger=tensorboard, csv, mlflow or many), or leave lr_monitor out of callbacks=[...].")
    summary = RunSummary(run_dir / "metrics.json", parameters=counts, hparams=hparams, monitor=monitor,
                         provenance=record.fields, listeners=[c for c in configured if isinstance(c, EpochListener)],
                         hparams_shown=shown_hparams(swept, hparams))
    callbacks = [*configured, summary, CheckpointOnInterrupt(), EndWithJob(), ExactResume(),
                 CollectiveTimeout(runtime.collective_timeout_s)]
    if (job.in_worker and cfg.trainer.get("enable_model_summary") is not False
            and not any(isinstance(c, ModelSummary) for c in configured)):
        # The layer table as a log record (the job's train.log), not Rich's print to the console the sweep shares.
        callbacks.append(ModelSummary())
    # A user's own plugins win over the atomic checkpoint writer.
    arguments: dict[str, Any] = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}
    interval = logging_interval(cfg.trainer, len(datamodule.load_split(datamodule.train_split)), datamodule.batch_size)
    if interval is not None:
        log.info("trainer.log_every_n_steps=%s is more than an epoch's %d batches: train/* is logged every %d steps",
                 cfg.trainer.log_every_n_steps, interval, interval)
        arguments["log_every_n_steps"] = interval
    trainer: pl.Trainer = instantiate(
        cfg.trainer, precision=runtime.precision, strategy=runtime.strategy, sync_batchnorm=runtime.sync_batchnorm,
        benchmark=runtime.benchmark, enable_progress_bar=show_progress,
        logger=logger, callbacks=callbacks, default_root_dir=str(run_dir), **arguments,
    )
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception as error:  # a rank that stopped answering: one paragraph, the record failed, exit status 2
        if trainer.world_size > 1 and is_collective_timeout(error):
            raise CollectiveTimeoutError(collective_timeout_message(error, trainer.global_rank,
                                                                    runtime.collective_timeout_s)) from error
        raise
    for stopper in trainer.early_stopping_callbacks:  # callbacks=[default,early_stopping]
        if stopper.stopped_epoch:
            record.note(early_stopped_at_epoch=int(stopper.stopped_epoch) + 1)
            log.info("Early stopping: %s did not improve for %d validations; stopped after epoch %d", stopper.monitor,
                     stopper.patience, stopper.stopped_epoch + 1)
    written = read_record(run_dir)
    if written is None or "history" not in written:  # e.g. resumed past max_epochs: nothing trained
        write_json_atomic(run_dir / "metrics.json", {**record.fields, **summary.summary(trainer)})
        written = read_record(run_dir) or {}
    if cfg.get("timing") and cfg.timing.get("predict") and record.write:
        record.note(**_time_prediction(cfg, net, datamodule, runtime, memory_format, trainer.strategy.root_device))

    loggers = logger if isinstance(logger, list) else [logger] if logger else []
    # Read back from the file: with a spawned DDP strategy the epochs were recorded in another process.
    best = best_value(written, summary.monitor)
    log.info("Run directory: %s (metrics.json, checkpoints/, %s) · best %s %.4f", run_dir,
             ", ".join(_describe_logger(lg) for lg in loggers) or "no logger", summary.monitor, best)
    return best
