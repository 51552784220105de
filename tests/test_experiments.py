"""Experiment presets compose to the study's settings and run as sweeps."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.conftest import QUIET, ROOT, TINY_SHAPES, read_json, run_entry_point


def test_compare_models_uses_the_study_settings() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=compare_models"], return_hydra_config=True)
    assert cfg.data.image_size == 128 and cfg.data.batch_size == 16
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.decay == 1e-3
    assert cfg.loss._target_.endswith("WeightedCrossEntropyLoss") and cfg.trainer.max_epochs == 25
    params = cfg.hydra.sweeper.params
    assert params.model.split(",") == ["fcn", "unet", "resunet", "pspnet", "deeplabv3plus"]
    assert params.seed.split(",") == ["1", "2", "3"]


def test_compare_models_smoke_sweep_on_shapes(shapes_root: Path, tmp_path: Path) -> None:
    run_entry_point("train.py", "-m", "experiment=compare_models", *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "hydra.sweeper.params.seed=1", f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    models = [OmegaConf.load(r / ".hydra" / "overrides.yaml") for r in runs]
    assert [next(o for o in m if o.startswith("model=")) for m in models] == [
        "model=fcn", "model=unet", "model=resunet", "model=pspnet", "model=deeplabv3plus"]
    assert all(read_json(r / "metrics.json")["parameters"]["trainable"] > 1_000_000 for r in runs)
