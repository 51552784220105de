"""Train a segmentation network: `segx-train` or `python train.py model=unet_small optimizer=sgd optimizer.lr=1e-3`."""

# ruff: noqa: E402  # the rank check comes before the other imports
from __future__ import annotations

from segx.core.ranks import end_with_the_job_if_a_rank

end_with_the_job_if_a_rank()  # first, before the imports below take seconds: a DDP rank must not outlive its job

import logging

import hydra
from omegaconf import DictConfig

from segx.core.config_dir import CONF_DIR
from segx.core.console import log_config_tree
from segx.core.errors import exit_on_user_error
from segx.core.job_console import quiet_job_console
from segx.runs.job import JobInfo, run_job
from segx.training.train import train

log = logging.getLogger("segx.train")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    job = JobInfo.from_hydra()
    if job.in_worker:  # its console is forwarded to the sweep's, beside every other job's
        quiet_job_console()
    log_config_tree(cfg, log)  # every run and sweep job: the composed config, first thing in its train.log
    with exit_on_user_error():
        return run_job(cfg, job, train)


if __name__ == "__main__":
    main()
