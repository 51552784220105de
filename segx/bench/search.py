"""What early stopping saves: one grid searched twice with `hydra/sweeper=tune`, every trial trained to the end and
then with ASHA, compared by the epochs each trained and the best score each found."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from segx.runs.discovery import find_runs
from segx.runs.record import DEFAULT_MONITOR, best_value
from segx.runs.status import STOPPED

LEARNING_RATES = ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2")
OPTIMIZERS = ("sgd", "adam")  # 6 × 2 = 12 configurations


def search_overrides(sweep_dir: Path, data_root: Path, epochs: int, size: int, scheduler: str) -> list[str]:
    """The benchmark's grid on generated shapes: a narrow U-Net, 12 configurations, one seed."""
    return ["-m", "hydra/sweeper=tune", f"hydra.sweeper.scheduler={scheduler}", "hydra.sweeper.grace_period=1",
            "hydra.sweeper.reduction_factor=3", f"hydra.sweep.dir={sweep_dir}",
            f"optimizer={','.join(OPTIMIZERS)}", f"optimizer.lr={','.join(LEARNING_RATES)}",
            "model=unet_small", "model.encoder_widths=[16,32]", "model.bottleneck_width=64", "data=shapes",
            f"data.root={data_root}", "data.num_train=96", "data.num_val=32", f"data.image_size={size}",
            "data.batch_size=8", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "logger=none",
            "callbacks.prediction_grid=null"]


def sweep_outcome(sweep_dir: Path) -> dict[str, Any]:
    """Epochs trained in all and the best monitored score of a search directory's trials."""
    runs = find_runs([sweep_dir])
    scores = [best_value(r.record, str(r.record.get("monitor", DEFAULT_MONITOR))) for r in runs]
    return {"trials": len(runs), "epochs": sum(int(r.record.get("epochs") or 0) for r in runs),
            "best": max((s for s in scores if not math.isnan(s)), default=float("nan")),
            "stopped": sum(r.status == STOPPED for r in runs)}


def compare_outcomes(grid: dict[str, Any], asha: dict[str, Any]) -> dict[str, Any]:
    """`search_epoch_fraction` (ASHA's epochs ÷ the full grid's) and `search_regret` (the grid's best − ASHA's)."""
    return {"search_epoch_fraction": asha["epochs"] / grid["epochs"] if grid["epochs"] else None,
            "search_regret": grid["best"] - asha["best"], "grid": grid, "asha": asha}


def search_comparison(workdir: Path, epochs: int = 12, size: int = 32) -> dict[str, Any]:
    """Both searches, each a `train.py -m` of its own (Ray starts and ends with it); folders under `workdir`."""
    outcomes = {}
    for scheduler in ("none", "asha"):
        sweep_dir = workdir / f"search-{scheduler}"
        command = [sys.executable, "-m", "segx.cli.train",
                   *search_overrides(sweep_dir, workdir / "search-shapes", epochs, size, scheduler)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the {scheduler} search failed ({done.returncode}):\n{done.stdout[-2000:]}"
                               f"\n{done.stderr[-2000:]}")
        outcomes[scheduler] = sweep_outcome(sweep_dir)
    return compare_outcomes(outcomes["none"], outcomes["asha"])
