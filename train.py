"""Train a segmentation network: `python train.py model=unet_small optimizer=sgd optimizer.lr=1e-3`."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from segx.errors import SegxError
from segx.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)
    except SegxError as error:
        logging.getLogger("segx").error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
