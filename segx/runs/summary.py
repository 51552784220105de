"""The Hydra callback around a multirun (`hydra.callbacks.sweep_summary` in conf/train.yaml): one sweep per
directory, and at the end the jobs that did not finish, listed, with a non-zero exit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segx.runs.discovery import RunDirectory, find_runs
from segx.runs.status import COMPLETED, STOPPED

log = logging.getLogger(__name__)


def unfinished_jobs(sweep_dir: str | Path) -> tuple[list[RunDirectory], list[RunDirectory]]:
    """(every job of the sweep, those that neither completed nor were stopped by a scheduler), in job order."""
    runs = find_runs([sweep_dir])
    return runs, [r for r in runs if r.unfinished]


class SweepSummary(Callback):
    """Hydra callback around a multirun: refuses to mix two different sweeps in one directory, suggests the
    GPU launcher on a multi-GPU machine, and at the end lists the failed jobs and exits non-zero."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        launcher = config.hydra.runtime.choices.get("hydra/launcher", "basic")
        if launcher == "basic":
            import torch

            if torch.cuda.device_count() > 1:
                log.warning("%d CUDA devices are visible but the basic launcher runs one job at a time on the "
                            "first: add hydra/launcher=gpus to run one job per GPU.", torch.cuda.device_count())
        previous = sweep_dir / "multirun.yaml"
        if previous.is_file():
            before = [str(o) for o in OmegaConf.load(previous).hydra.overrides.task]
            now = [str(o) for o in config.hydra.overrides.task]
            if before != now:
                log.error(
                    "hydra.sweep.dir=%s already holds a different sweep (its overrides: %s; yours: %s). Re-running "
                    "the same command there skips its completed jobs and resumes the rest; for a different sweep "
                    "choose a new hydra.sweep.dir, or delete that folder to start over.",
                    sweep_dir, " ".join(before) or "none", " ".join(now) or "none",
                )
                sys.exit(2)
            log.info("Continuing the sweep in %s: completed jobs are skipped, interrupted ones resume.", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs, failed = unfinished_jobs(sweep_dir)
        completed = sum(r.status == COMPLETED for r in runs)
        stopped = sum(r.status == STOPPED for r in runs)
        log.info("Sweep %s: %d jobs, %d completed, %d failed%s", sweep_dir, len(runs), completed, len(failed),
                 f", {stopped} stopped early by the scheduler" if stopped else "")
        if not failed:
            return
        lines = [f"  {run.run_dir}: {run.reason}" for run in failed]
        log.error("%d of %d jobs failed (details in each run directory's metrics.json and log):\n%s\nFix the cause "
                  "and run the same command with hydra.sweep.dir=%s: completed jobs are skipped.",
                  len(failed), len(runs), "\n".join(lines), sweep_dir)
        sys.exit(1)
