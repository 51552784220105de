"""The Hydra callback before a single run writes anything (`hydra.callbacks.run_guard` in conf/train.yaml): it
claims the run directory for this process and refuses a resume of another network, both before Hydra writes
`.hydra/` and the log into the folder."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from segx.core.errors import SegxError
from segx.core.ranks import is_rank_zero
from segx.runs.job import resolve_ckpt_path
from segx.runs.ownership import claim_run_dir, release_run_dir
from segx.training.resume_check import check_resume

log = logging.getLogger("segx")


class RunGuard(Callback):
    """Refuses, in one paragraph and with exit code 2, a run directory another live process owns and a resume whose
    checkpoint holds another network, other classes or another image size; the folder is left as it was."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not is_rank_zero():  # the other ranks of a DDP run share rank 0's directory
            return
        run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        try:
            ckpt_path = resolve_ckpt_path(config.get("ckpt_path"), run_dir)
            if ckpt_path is not None:  # read-only: a refused resume leaves no trace in the folder
                check_resume(ckpt_path, config)
            claim_run_dir(run_dir)
        except SegxError as error:
            release_run_dir(run_dir)
            log.error("%s", error)
            sys.exit(2)
