"""Train a segmentation network: `python train.py model=unet_small optimizer=sgd optimizer.lr=1e-3`."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from segx.errors import exit_on_user_error
from segx.sweep import JobInfo, run_job
from segx.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    with exit_on_user_error():
        return run_job(cfg, JobInfo.from_hydra(), train)


if __name__ == "__main__":
    main()
