"""`hydra/launcher=gpus`: hydra-ray-launcher with each job named in the log and a dead worker isolated.

Ray does the scheduling (one job per GPU it hands out, on one machine or a cluster); this subclass only
changes what the plugin leaves rough for sweeps: log lines are prefixed `(job N pid=...)` instead of
`(_run_job pid=...)`, Ray does not fold identical lines of different jobs into one, and a job whose
worker died after all its retries is recorded as failed in its own run directory instead of aborting
the results of every other job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import OmegaConf, open_dict

from segx.runs.job import record_worker_death

log = logging.getLogger(__name__)


def _show_every_log_line() -> None:
    """Ray folds lines that differ only in numbers ("Epoch 3/25 ... [repeated 3x across cluster]"), which
    hides whole jobs' progress. RAY_DEDUP_LOGS=0 turns that off, but Ray reads it when first imported (by
    plugin discovery, before this runs), so the flag it copied is set as well."""
    os.environ["RAY_DEDUP_LOGS"] = "0"
    try:
        from ray._private import ray_logging

        ray_logging.RAY_DEDUP_LOGS = False
    except (ImportError, AttributeError):  # a Ray without that module: the environment variable is all there is
        pass


class GpuLauncher(RayLauncher):
    """Launches every job as a Ray task with `hydra.launcher.ray.remote` resources (one GPU by default)."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        _show_every_log_line()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True)
        remote = OmegaConf.to_container(self.ray_cfg.remote, resolve=True)
        log.info("Launching %d jobs on Ray (%s GPU(s) each) into %s", len(job_overrides), remote.get("num_gpus", 0),
                 sweep_dir)
        start_ray(OmegaConf.create({k: v for k, v in init.items() if v is not None or k == "address"}))

        launched = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
            ref = launch_job_on_ray(self.hydra_context, OmegaConf.create({**remote, "name": f"job {idx}"}),
                                    sweep_config, self.task_function, Singleton.get_state())
            launched.append((idx, list(overrides), sweep_config, ref))

        results = []
        for idx, overrides, sweep_config, ref in launched:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayError as error:
                results.append(self._worker_died(idx, overrides, sweep_config, remote, error))
        return results

    @staticmethod
    def _worker_died(idx: int, overrides: list[str], sweep_config: object, remote: dict,
                     error: BaseException) -> JobReturn:
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        retries = remote.get("max_retries", 3)
        summary = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        message = (f"The Ray worker running job {idx} died and was retried {retries} time(s) "
                   f"(hydra.launcher.ray.remote.max_retries); Ray said: {summary}")
        log.error("Job %d: %s", idx, message)
        record_worker_death(run_dir, idx, list(filter_overrides(overrides)), "gpus", message)
        # Recorded as failed in its run directory; returned as a finished job so the sweep reports it
        # with the others (SweepSummary) instead of Hydra raising before the summary.
        return JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=sweep_config, working_dir=str(run_dir),
                         task_name=str(sweep_config.hydra.job.name), status=JobStatus.COMPLETED,
                         _return_value=float("nan"))
