"""The study's experiments as presets: their settings, exact job counts, and each one's CPU smoke sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from segx import report
from segx.runs.record import read_record
from segx.runs.status import COMPLETED
from tests.conftest import ROOT, TINY_SHAPES, run_in_process

PRESET_JOBS = {"optimizer_grid": 36, "loss_grid": 42, "size_study": 9, "best_setting": 3, "compare_models": 36}
# The study's comparisons as its code ran them: one chained 75-epoch run per model or loss, no seeds.
CHAINED_JOBS = {"compare_models_chained": 4, "loss_comparison_chained": 4}
STUDY_NETWORKS = ["fcn_study", "unet", "resunet_study", "pspnet_study"]
# segx's loss experiment: each loss with and without class weights (hinge, kl and lovasz unweighted only).
STUDY_LOSSES = {"ce", "weighted_ce", "dice", "weighted_dice", "focal", "weighted_focal", "jaccard", "weighted_jaccard",
                "tversky", "weighted_tversky", "hinge", "kl", "lovasz"}
NARROW_UNET = ["model.encoder_widths=[8,16,32,64]", "model.bottleneck_width=128"]  # the study's depth, 1/8 width
# No checkpoints: full-size networks with optimizer state are ~0.7 GB per job (best + last), 23 GB per suite run.
SMOKE = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
         "trainer.num_sanity_val_steps=0", "logger=none", "callbacks.prediction_grid=null", "data.batch_size=4",
         "callbacks.model_checkpoint=null", "trainer.enable_checkpointing=false", "hydra.sweeper.params.seed=1"]
# The study's four networks with its ResU-Net at 1/16 width (tests/conf/model/resunet_study_narrow.yaml): at full
# width its 401.6M parameters take ~20 s a training step on a CPU, 6 GB with Adam's state.
SMOKE_NETWORKS = [f"hydra.searchpath=[file://{ROOT / 'tests' / 'conf'}]",
                  "hydra.sweeper.params.model='fcn_study,unet,resunet_study_narrow,pspnet_study'"]


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


@pytest.mark.parametrize("name, jobs", CHAINED_JOBS.items())
def test_the_chained_presets_are_the_studys_code(name: str, jobs: int) -> None:
    cfg = preset(name)
    assert "seed" not in cfg.hydra.sweeper.params and len(expanded_jobs(cfg.hydra.sweeper.params)) == jobs
    assert (cfg.chained_trials, cfg.trainer.max_epochs) == (3, 75)
    assert (cfg.optimizer._target_, cfg.optimizer.lr, cfg.optimizer.decay) == ("torch.optim.Adam", 1e-4, 1e-3)
    assert cfg.optimizer.keras_epsilon is True and cfg.data.batch_size == 16 and cfg.protocol.name == "study"
    if name == "compare_models_chained":
        assert str(cfg.hydra.sweeper.params.model).split(",") == STUDY_NETWORKS
        assert cfg.loss.weighting == "neg_log" and cfg.loss.probability_clip == 1e-7
    else:
        assert str(cfg.hydra.sweeper.params.loss).split(",") == ["weighted_ce", "ce", "hinge", "kl"]
        assert cfg.model._target_ == "segx.models.UNet"


@pytest.mark.parametrize("name", [*PRESET_JOBS, *CHAINED_JOBS])
def test_every_study_preset_runs_in_the_study_protocol_unless_told_otherwise(name: str) -> None:
    study = preset(name)
    assert study.protocol == {"name": "study", "study_metrics": True, "probability_clip": 1e-7}
    assert (study.data.void_label, study.data.interpolation, study.data.channel_order) == ("background", "cv2", "bgr")
    assert list(study.data.mean) == [0, 0, 0] and list(study.data.std) == [1, 1, 1]
    assert study.data.augment.hflip is False and study.trainer.precision == "32-true"
    segx = preset(name, "protocol=segx")
    assert segx.protocol.study_metrics is False and segx.data.channel_order == "rgb"
    assert segx.data.void_label == "ignore" and segx.trainer.precision == "auto"


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
    assert str(models.hydra.sweeper.params.model).split(",") == STUDY_NETWORKS
    fcn = preset("compare_models", "model=fcn_study").model
    assert (fcn.upsample_mode, fcn.classifier_activation, fcn.dropout) == ("nearest", "relu", 0.2)  # as Keras ran it
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
    narrow = SMOKE_NETWORKS if name == "compare_models" else [] if name == "size_study" else NARROW_UNET
    result = run_in_process("train.py", "-m", f"experiment={name}", *TINY_SHAPES, *SMOKE, *narrow,
                             f"data.root={shapes_root}", f"hydra.sweep.dir={tmp_path}")
    runs = sorted((p.parent for p in tmp_path.glob("*/metrics.json")), key=lambda p: int(p.name))
    assert len(runs) == PRESET_JOBS[name] // 3, result.stdout[-3000:]
    if name == "compare_models":
        assert PRESET_JOBS[name] // 3 == 12  # the study's four networks × three learning rates
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
        assert len(rows) == 12 and all(r["runs"] == 1 and 0 <= r["max"] <= 1 for r in rows)
        settings = [dict(o.split("=") for o in r["setting"].split()) for r in rows]
        networks = ("fcn_study", "unet", "resunet_study_narrow", "pspnet_study")
        assert {(s["model"], float(s["optimizer.lr"])) for s in settings} == {
            (m, lr) for m in networks for lr in (1e-3, 1e-4, 1e-5)}
        for record in records:  # the study's metrics beside the real ones, in the study's protocol
            final = record["history"][-1]
            assert {"val/study_meaniou", "val/study_iou_no_bg", "val/miou"} <= set(final)
            assert 0 <= final["val/study_meaniou"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("name", CHAINED_JOBS)
def test_chained_smoke_sweep_reports_the_studys_points(name: str, shapes_root: Path, tmp_path: Path) -> None:
    """The study's comparisons as its code ran them, 3 windows of 1 epoch per network or loss, and their report."""
    smoke = [o for o in SMOKE if not o.startswith(("trainer.max_epochs", "hydra.sweeper.params.seed"))]
    narrow = SMOKE_NETWORKS if name == "compare_models_chained" else NARROW_UNET
    run_in_process("train.py", "-m", f"experiment={name}", *TINY_SHAPES, *smoke, *narrow,
                   "trainer.max_epochs=3", f"data.root={shapes_root}", f"hydra.sweep.dir={tmp_path}")
    records = [read_record(p.parent) for p in sorted(tmp_path.glob("*/metrics.json"))]
    assert len(records) == 4 and all(r["status"] == COMPLETED for r in records), [r.get("error") for r in records]
    for record in records:
        assert record["chained_trials"] == {"trials": 3, "epochs_per_trial": 1} and len(record["history"]) == 3
        assert all("val/study_meaniou" in epoch and "val/acc" in epoch for epoch in record["history"])
    report.main([str(tmp_path)])
    markdown = (tmp_path / "report.md").read_text()
    assert "## The study's points (chained trials)" in markdown and (tmp_path / "plots" / "study_points.png").exists()
    with open(tmp_path / "study_points.csv", newline="") as file:
        points = list(csv.DictReader(file))
    assert len(points) == 4 * 3 and {p["kind"] for p in points} == {"chained"}  # every job's three windows
    for job, record in enumerate(records):  # a window of one epoch: its maxima are that epoch's values
        for trial, epoch in enumerate(record["history"], start=1):
            point = next(p for p in points if p["job"] == str(job) and p["trial"] == str(trial))
            assert float(point["val_acc_max"]) == pytest.approx(epoch["val/acc"])
            assert float(point["val_study_meaniou_max"]) == pytest.approx(epoch["val/study_meaniou"])
