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
from segx.runs.overrides import sweep_axes, sweep_command
from segx.runs.record import lost_attempts
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
            self._check_same_jobs(sweep_dir, OmegaConf.load(previous), config)

    @staticmethod
    def _check_same_jobs(sweep_dir: Path, before: DictConfig, now: DictConfig) -> None:
        """Refuse only a different set of jobs (other swept keys or values), which would mix results; a changed
        setting every job shares (a fixed data.root, say) is accepted and logged; a folder where no job ran is
        always taken."""
        if not find_runs([sweep_dir]):
            log.info("hydra.sweep.dir=%s holds no job yet: the sweep starts there afresh.", sweep_dir)
            return
        try:
            axes_before, shared_before = sweep_axes(sweep_command(before))
        except Exception:  # a multirun.yaml of another tool or version: only the same command is safe
            axes_before, shared_before = None, {}
        axes_now, shared_now = sweep_axes(sweep_command(now))
        if axes_before != axes_now:
            shown = " ".join(f"{k}={','.join(v)}" for k, v in (axes_before or {}).items()) or "unreadable"
            log.error(
                "hydra.sweep.dir=%s already holds a different sweep: its jobs vary %s, yours vary %s. Mixing them "
                "would put results of two sweeps under one set of job numbers. Re-running with the same swept "
                "values there skips the completed jobs and re-runs the rest (changed shared settings such as "
                "data.root are fine); for a different sweep choose a new hydra.sweep.dir, or delete that folder.",
                sweep_dir, shown, " ".join(f"{k}={','.join(v)}" for k, v in axes_now.items()) or "nothing",
            )
            sys.exit(2)
        changed = {key: (shared_before.get(key), shared_now.get(key))
                   for key in sorted(set(shared_before) | set(shared_now))
                   if shared_before.get(key) != shared_now.get(key)}
        if changed:
            log.info("Continuing the sweep in %s with changed shared settings (%s): completed jobs are kept, the "
                     "others run with the new settings.", sweep_dir,
                     ", ".join(f"{key} {old or '(unset)'} → {new or '(unset)'}" for key, (old, new) in changed.items()))
            return
        log.info("Continuing the sweep in %s: completed jobs are skipped, interrupted ones resume.", sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        runs, failed = unfinished_jobs(sweep_dir)
        completed = sum(r.status == COMPLETED for r in runs)
        stopped = sum(r.status == STOPPED for r in runs)
        retried = sum(lost_attempts(r.record) > 0 for r in runs)
        log.info("Sweep %s: %d jobs, %d completed, %d failed%s%s", sweep_dir, len(runs), completed, len(failed),
                 f", {stopped} stopped early by the scheduler" if stopped else "",
                 f", {retried} retried after a lost worker" if retried else "")
        if not failed:
            return
        lines = [f"  {run.run_dir}: {run.reason}" for run in failed]
        sweeper = OmegaConf.select(config, "hydra.sweeper._target_", default="")
        if str(sweeper).endswith("TuneSweeper"):  # Tune's restore keeps finished trials, failed or not
            again = ("Fix the cause and start the search again in a new hydra.sweep.dir: resuming this one (the same "
                     "command) finishes interrupted trials but keeps failed ones as they are.")
        else:
            again = (f"Fix the cause and run the same command with hydra.sweep.dir={sweep_dir}: completed jobs are "
                     "skipped.")
        log.error("%d of %d jobs failed (details in each run directory's metrics.json and log):\n%s\n%s",
                  len(failed), len(runs), "\n".join(lines), again)
        sys.exit(1)
