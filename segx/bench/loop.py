"""`lightning_overhead` and the peak fractions: segx's real training step and inference path against a bare loop.

The Lightning side is `segx.training.train.train` itself (data on the device, augmentation, loss, confusion-matrix
metrics, logging, the non-finite-loss check, optimizer and schedule), timed per step by a callback from the
first step after `warmup` to the last; start-up, validation and checkpoints are left out. The bare side is
the loop a user would write around the same network, batches, optimizer, precision and memory format.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from segx.bench.peak import synchronize
from segx.core.config_dir import config_dir
from segx.inference.predictor import Predictor, autocast_for
from segx.inference.timing import time_prediction
from segx.models import build_network, forward_flops, run_options
from segx.runs.job import JobInfo

CONF_DIR = config_dir()


class StepTimer(pl.Callback):
    """Writes the seconds of each training step after `warmup` (batch start to the next batch start, so the
    loop's own work between steps counts) to `path`. Only the first and last marks wait for a GPU (steps
    overlap there), so on CUDA only the mean of the durations is meaningful; on the CPU each one is."""

    def __init__(self, path: str, warmup: int, steps: int) -> None:
        self.path, self.warmup, self.steps = Path(path), int(warmup), int(steps)
        self._marks: list[float] = []

    def _mark(self, device: torch.device) -> None:
        if not self._marks:
            synchronize(device)
        self._marks.append(time.perf_counter())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step >= self.warmup:
            self._mark(pl_module.device)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.warmup + self.steps and self._marks:
            synchronize(pl_module.device)
            self._marks.append(time.perf_counter())
            durations = [b - a for a, b in zip(self._marks, self._marks[1:], strict=False)]
            self.path.write_text(json.dumps({"step_seconds": durations}))


def run_config(network: str, root: Path, size: int, batch_size: int, accelerator: str, precision: str,
               steps: int, overrides: list[str] = ()) -> DictConfig:
    """segx's training config for the benchmark: the chosen network, plain cross-entropy, Adam, no validation,
    no checkpoints and no logger (their cost is per epoch, not per step)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[
            f"model={network}", "loss=ce", "optimizer=adam", f"data.root={root}", f"data.image_size={size}",
            f"data.batch_size={batch_size}", "logger=none", "callbacks.model_checkpoint=null",
            "callbacks.prediction_grid=null", "callbacks.progress=null", "trainer.enable_checkpointing=false",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
            f"trainer.accelerator={accelerator}", f"trainer.precision={precision}", "run.channels_last=true",
            *overrides,
        ])


def lightning_step_seconds(cfg: DictConfig, warmup: int, steps: int) -> list[float]:
    """Seconds of each timed step of `segx.training.train.train` on `cfg` (its data are read from `cfg.data.root`)."""
    from segx.training.train import train

    with tempfile.TemporaryDirectory(prefix="segx-bench-run-") as run_dir:
        timer_file = Path(run_dir) / "steps.json"
        cfg.trainer.max_steps = warmup + steps
        OmegaConf.set_struct(cfg, False)
        cfg.callbacks.step_timer = {"_target_": f"{__name__}.StepTimer", "path": str(timer_file), "warmup": warmup,
                                    "steps": steps}
        train(cfg, JobInfo(run_dir=Path(run_dir)))
        return list(json.loads(timer_file.read_text())["step_seconds"])


def training_step(net: torch.nn.Module, precision: str, lr: float) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The step a user writes around `net`: forward (autocast when mixed), cross-entropy, backward, Adam."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()

    def step(images: torch.Tensor, masks: torch.Tensor) -> None:
        with autocast_for(precision, images.device):
            loss = F.cross_entropy(net(images), masks, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def bare_step_seconds(net: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision: str,
                      lr: float, warmup: int) -> list[float]:
    """Seconds of each timed step of the loop a user writes: forward, cross-entropy, backward, Adam, over
    ready-made `batches` (the first `warmup` untimed). On CUDA, where steps overlap, every entry is the mean."""
    device = batches[0][0].device
    step = training_step(net, precision, lr)
    for batch in batches[:warmup]:
        step(*batch)
    synchronize(device)
    timed = batches[warmup:]
    if device.type == "cuda":
        start = time.perf_counter()
        for batch in timed:
            step(*batch)
        synchronize(device)
        return [(time.perf_counter() - start) / len(timed)] * len(timed)
    durations = []
    for batch in timed:
        start = time.perf_counter()
        step(*batch)
        durations.append(time.perf_counter() - start)
    return durations


def training_flops(net: torch.nn.Module, batch_size: int, size: int) -> int:
    """FLOPs of one forward + backward of a batch, counted on a meta-device copy (the optimizer's are negligible)."""
    probe = copy.deepcopy(net).to("meta").train()
    counter = FlopCounterMode(display=False)
    with counter:
        probe(torch.empty(batch_size, 3, size, size, device="meta")).sum().backward()
    return int(counter.get_total_flops())


def training_batches(datamodule: Any, count: int, channels_last: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `count` training batches as segx's loop draws and augments them, made ready for the network
    in advance (so the bare loop pays nothing for its data)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    batches = []
    for batch in datamodule.train_dataloader():
        images, masks = datamodule.prepare_batch(batch, training=True)
        batches.append((images.contiguous(memory_format=memory_format), masks))
        if len(batches) == count:
            return batches
    raise ValueError(f"the training split has fewer than {count} batches; lower --steps or --warmup")


def loop_comparison(cfg: DictConfig, device: torch.device, warmup: int, steps: int, peak_gflops: float,
                    infer_images: int) -> dict[str, Any]:
    """`lightning_overhead`, `train_peak_fraction` and `infer_peak_fraction` for the network of `cfg`."""
    from hydra.utils import instantiate

    from segx.training.runtime import precision_for

    size, batch_size = int(cfg.data.image_size), int(cfg.data.batch_size)
    precision = precision_for(cfg.trainer.precision, cfg.trainer.accelerator)
    options = run_options(cfg)
    channels_last = options["channels_last"] is True  # not `auto`: both loops must run in one format
    cfg.run.channels_last = channels_last
    torch.set_flush_denormal(options["flush_denormal"])  # as segx's run sets it, for both loops
    datamodule = instantiate(cfg.data)
    datamodule.target_device = device
    batches = training_batches(datamodule, warmup + steps, channels_last)

    def bare_run(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.nn.Module, list[float]]:
        torch.manual_seed(0)
        net = build_network(cfg.model, {"channels_last": channels_last}).to(device)
        return net, bare_step_seconds(net, batches, precision, float(cfg.optimizer.lr), warmup)

    # The bare loop runs before and after segx's, and the two are averaged: a drift of the machine's speed
    # (clock, other load) during the measurement then falls on both sides alike.
    _, bare_before = bare_run(batches)
    lightning_steps = lightning_step_seconds(copy.deepcopy(cfg), warmup, steps)
    net, bare_after = bare_run(batches)
    bare_steps = bare_before + bare_after
    del batches  # ~15 MB on the device
    flops = training_flops(build_network(cfg.model), batch_size, size)
    split = datamodule.load_split(datamodule.val_split)
    count = min(infer_images, len(split))
    predictor = Predictor(net, device, precision, channels_last=channels_last, normalize=datamodule.normalizer,
                          batch_size=batch_size)
    timing = time_prediction(predictor, split.images[:count], passes=3, warmup=1)
    infer_flops = forward_flops(net, size) * count
    cuda = device.type == "cuda"
    typical = statistics.fmean if cuda else statistics.median  # CPU timings have spikes; GPU steps overlap
    lightning = typical(lightning_steps)
    bare = statistics.fmean([typical(bare_before), typical(bare_after)])
    return {
        "lightning_overhead": {
            "ratio": lightning / bare, "lightning_step_seconds": lightning, "bare_step_seconds": bare,
            "network": cfg.model._target_, "batch_size": batch_size, "image_size": size, "steps": steps,
            "warmup_steps": warmup, "precision": precision, "channels_last": channels_last,
            "statistic": "mean" if cuda else "median", "lightning_steps": lightning_steps, "bare_steps": bare_steps,
        },
        "train_peak_fraction": {
            "fraction": flops / lightning / 1e9 / peak_gflops, "achieved_gflops": flops / lightning / 1e9,
            "bare_loop_fraction": flops / bare / 1e9 / peak_gflops, "flops_per_step": flops,
            "through": "segx.training.train.train (Lightning, loss, metrics, optimizer)",
        },
        "infer_peak_fraction": {
            "fraction": infer_flops / timing["predict_val_seconds"] / 1e9 / peak_gflops,
            "achieved_gflops": infer_flops / timing["predict_val_seconds"] / 1e9, "images": count,
            "batch_size": batch_size, "through": "segx.inference.predictor.Predictor (labels of uint8 images)",
        },
    }
