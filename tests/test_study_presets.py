"""The study's experiments as presets: their settings, exact job counts, and each one's CPU smoke sweep."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from segx import report
from segx.runs.record import read_record
from segx.runs.status import COMPLETED
from tests.conftest import QUIET, ROOT, TINY_SHAPES, run_in_process

PRESET_JOBS = {"optimizer_grid": 36, "loss_grid": 39, "size_study": 9, "best_setting": 3, "compare_models": 45}
# The study's loss experiment: each of its losses with and without class weights (its hinge unweighted only).
STUDY_LOSSES = {"ce", "weighted_ce", "dice", "weighted_dice", "focal", "weighted_focal", "jaccard", "weighted_jaccard",
                "tversky", "weighted_tversky", "hinge", "lovasz"}
NARROW_UNET = ["model.encoder_widths=[8,16,32,64]", "model.bottleneck_width=128"]  # the study's depth, 1/8 width
# No checkpoints: full-size networks with optimizer state are ~0.7 GB per job (best + last), 23 GB per suite run.
SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
         "trainer.num_sanity_val_steps=0", "logger=none", "callbacks.prediction_grid=null", "data.batch_size=4",
         "callbacks.model_checkpoint=null", "trainer.enable_checkpointing=false", "hydra.sweeper.params.seed=1"]


def preset(name: str, *overrides: str) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


def expanded_jobs(params: DictConfig) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of `hydra.sweeper.params`, with `glob(*)` expanded by Hydra's own config
    loader over conf/ (so a loss file added or removed changes the count)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    parsed = OverridesParser.create(config_loader=loader).parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("name, jobs", PRESET_JOBS.items())
def test_preset_job_counts_are_the_studys(name: str, jobs: int) -> None:
    params = preset(name).hydra.sweeper.params
    assert params.seed == "1,2,3"
    assert len(expanded_jobs(params)) == jobs


def test_the_loss_grid_runs_every_loss_of_the_study_for_three_seeds() -> None:
    jobs = expanded_jobs(preset("loss_grid").hydra.sweeper.params)
    losses = [dict(o.split("=", 1) for o in job)["loss"] for job in jobs]
    assert STUDY_LOSSES <= set(losses)
    assert all(losses.count(loss) == 3 for loss in set(losses))  # seeds 1, 2, 3 of each


def test_optimizer_grid_pairs_learning_rates_with_decay_instead_of_a_product() -> None:
    pairs = set()
    for choice in str(preset("optimizer_grid").hydra.sweeper.params.lr_decay).split(","):
        cfg = preset("optimizer_grid", f"lr_decay={choice}", "optimizer=sgd")
        pairs.add((cfg.optimizer.lr, cfg.optimizer.decay))
    assert pairs == {(1e-3, 0.0), (1e-4, 0.0), (1e-5, 0.0), (1e-4, 1e-3)}
    assert str(preset("optimizer_grid").hydra.sweeper.params.optimizer).split(",") == ["adam", "sgd", "adamax"]


def test_presets_use_the_studys_settings() -> None:
    best = preset("best_setting")
    assert best.optimizer._target_ == "torch.optim.SGD" and (best.optimizer.lr, best.optimizer.decay) == (1e-4, 1e-3)
    assert best.trainer.max_epochs == 100 and best.monitor == "val/miou" and best.loss.weighting == "neg_log"
    size = preset("size_study")
    assert size.monitor == "val/miou_no_bg" and size.timing.predict is True and size.timing.passes == 5
    assert str(size.hydra.sweeper.params.model).split(",") == ["unet", "unet_medium", "unet_small"]
    models = preset("compare_models")
    assert str(models.hydra.sweeper.params.model).split(",") == ["fcn_keras", "unet", "resunet", "pspnet",
                                                                 "deeplabv3plus"]
    assert preset("compare_models", "model=fcn_keras").model.upsample_mode == "nearest"  # as Keras' UpSampling2D
    assert preset("compare_models", "model=fcn").model.upsample_mode == "bilinear"
    assert str(models.hydra.sweeper.params["optimizer.lr"]).split(",") == ["1e-3", "1e-4", "1e-5"]
    assert models.data.augment.hflip is False and models.data.image_size == 128 and models.data.batch_size == 16
    losses = preset("loss_grid")
    assert (losses.optimizer._target_, losses.optimizer.lr, losses.optimizer.decay) == ("torch.optim.Adam", 1e-4, 1e-3)
    assert losses.trainer.max_epochs == 25 and losses.model._target_ == "segx.models.UNet"


def test_every_optimizer_starts_from_the_same_learning_rate() -> None:
    for path in sorted((ROOT / "conf" / "optimizer").glob("*.yaml")):
        assert OmegaConf.load(path).lr == 1e-4, path.name


@pytest.mark.slow
@pytest.mark.parametrize("name", PRESET_JOBS)
def test_preset_smoke_sweep_on_shapes(name: str, shapes_root: Path, tmp_path: Path) -> None:
    """Each preset's CPU smoke version (seed 1 only) runs every job of its grid."""
    # Presets of the study's U-Net alone sweep optimizers, rates and losses, not the network: a narrow U-Net of the
    # same depth runs their jobs in a fraction of the time. Model-comparing presets keep their networks whole.
    narrow = [] if name in ("compare_models", "size_study") else NARROW_UNET
    result = run_in_process("train.py", "-m", f"experiment={name}", *TINY_SHAPES, *QUIET, *SMOKE, *narrow,
                             f"data.root={shapes_root}", f"hydra.sweep.dir={tmp_path}")
    runs = sorted((p.parent for p in tmp_path.glob("*/metrics.json")), key=lambda p: int(p.name))
    assert len(runs) == PRESET_JOBS[name] // 3, result.stdout[-3000:]
    records = [read_record(r) for r in runs]
    assert all(r["status"] == COMPLETED for r in records), [r.get("error") for r in records]
    assert len({tuple(r["overrides"]) for r in records}) == len(records)  # every job a different setting
    if name == "size_study":
        for record in records:
            assert record["monitor"] == "val/miou_no_bg"
            assert record["predict_val_seconds"] > 0 and record["predict_images"] == 16
            assert len(record["predict_pass_seconds"]) == 5
            assert record["predict_images_per_second"] == pytest.approx(16 / record["predict_val_seconds"])
    if name == "compare_models":  # the sweep reads back as one row per model and learning rate
        rows = report.main([str(tmp_path), "--json", str(tmp_path / "summary.json")])
        assert len(rows) == 15 and all(r["runs"] == 1 and 0 <= r["max"] <= 1 for r in rows)
        settings = [dict(o.split("=") for o in r["setting"].split()) for r in rows]
        assert {(s["model"], float(s["optimizer.lr"])) for s in settings} == {
            (m, lr) for m in ("fcn_keras", "unet", "resunet", "pspnet", "deeplabv3plus") for lr in (1e-3, 1e-4, 1e-5)}
