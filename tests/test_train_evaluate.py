"""train.py and evaluate.py end to end, through Hydra, on the shapes dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from tensorboard.plugins.hparams import plugin_data_pb2

from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

CHANCE_MIOU = 0.05  # all-background on shapes: ~0.7 IoU for one class out of 21 present


@pytest.mark.slow
def test_fast_dev_run_through_hydra(shapes_root: Path, tmp_path: Path) -> None:
    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, f"data.root={shapes_root}",
                    "trainer.fast_dev_run=true", f"hydra.run.dir={tmp_path}")
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert read_json(tmp_path / "metrics.json")["parameters"]["trainable"] > 0


def test_training_learns_and_leaves_a_complete_run_dir(trained_run: Path) -> None:
    metrics = read_json(trained_run / "metrics.json")
    assert metrics["epochs"] == 10 and len(metrics["history"]) == 10
    best = metrics["best"]["val/miou"]
    assert best > 3 * CHANCE_MIOU, f"val mIoU {best:.3f} does not clearly beat chance"
    assert best == max(h["val/miou"] for h in metrics["history"])
    final = metrics["final"]
    for key in ("train/loss", "train/acc", "train/miou", "val/loss", "val/acc", "val/miou", "val/miou_no_bg",
                "val/iou/background"):
        assert key in final, key
    assert metrics["history"][-1]["val/loss"] < metrics["history"][0]["val/loss"]
    assert metrics["seconds_per_epoch"] > 0 and metrics["total_seconds"] >= sum(metrics["epoch_seconds"]) * 0.9
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert Path(metrics["best_checkpoint"]) == trained_run / "checkpoints" / "best.ckpt"
    assert (trained_run / ".hydra" / "overrides.yaml").is_file()


def test_learning_rate_decays_per_batch(trained_run: Path) -> None:
    metrics = read_json(trained_run / "metrics.json")
    steps_per_epoch = 96 // 8
    for entry in metrics["history"]:
        steps = (int(entry["epoch"]) + 1) * steps_per_epoch
        assert entry["train/lr"] == pytest.approx(3e-3 / (1 + 1e-3 * steps), rel=1e-6)


@pytest.mark.slow
def test_evaluate_reproduces_the_logged_val_miou(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    # training validates in fp32: so does this evaluation (auto would take bf16 on a CPU with bf16 units)
    result = run_in_process("evaluate.py", f"ckpt={ckpt}", "inference.precision=32-true", f"hydra.run.dir={tmp_path}")
    scores = read_json(tmp_path / "metrics.json")
    logged = read_json(trained_run / "metrics.json")["best"]
    assert scores["miou"] == pytest.approx(logged["val/miou"], abs=1e-4)
    assert scores["pixel_acc"] == pytest.approx(logged["val/acc"], abs=1e-4)
    assert scores["miou_no_bg"] == pytest.approx(logged["val/miou_no_bg"], abs=1e-4)
    assert scores["n_images"] == 16 and scores["seconds"] > 0
    assert set(scores["per_class_iou"]) >= {"background", "aeroplane", "tvmonitor"}
    assert "IoU per class" in result.stdout


@pytest.mark.slow
def test_full_resolution_evaluation_and_saved_predictions(trained_run: Path, shapes_root: Path,
                                                          tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    run_in_process("evaluate.py", f"ckpt={ckpt}", "full_res=true", "save_predictions=true",
                    f"hydra.run.dir={tmp_path}")
    scores = read_json(tmp_path / "metrics.json")
    assert scores["full_res"] is True and 3 * CHANCE_MIOU < scores["miou"] <= 1
    predictions = sorted((tmp_path / "predictions").glob("*.png"))
    assert len(predictions) == 16
    voc = shapes_root / "VOCdevkit" / "VOC2012"
    for path in predictions[:4]:
        pred = Image.open(path)
        assert pred.mode == "P"
        assert pred.size == Image.open(voc / "SegmentationClass" / path.name).size


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_network(trained_run: Path) -> None:
    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    net = network_from_checkpoint(checkpoint).eval()
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, 21, 32, 32)
    assert checkpoint["segx"]["config"]["model"]["encoder_widths"] == [16, 32]


def test_tensorboard_holds_val_scalars_and_the_prediction_grid(trained_run: Path) -> None:
    [event_file] = (trained_run / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"val/miou", "val/acc", "val/loss", "val/miou_no_bg", "train/loss", "train/miou"} <= scalars
    assert len(events.Scalars("val/miou")) == 10
    assert "val/predictions" in events.Tags()["images"]
    image = events.Images("val/predictions")[-1]
    assert image.width > 3 * 32 and image.height > 4 * 32  # 4 rows of image | truth | prediction
    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["model.encoder_widths"].string_value == "[16, 32]"
    assert start.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(3e-3)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    # A sweep compared at a glance: the group choices, the headline numbers and the typed keys, a few columns; a
    # few headline scores as columns, read from curves of the val group (no card per class, no `hp/` or `epoch`
    # cards ahead of the curves).
    columns = set(start.session_start_info.hparams)
    assert {"model", "optimizer", "loss", "data", "optimizer.lr", "data.batch_size", "seed"} <= columns
    assert start.session_start_info.hparams["model"].string_value == "unet_small" and len(columns) <= 25
    assert _opening_columns(experiment) == ["loss", "model", "optimizer", "optimizer.lr"]
    titles = {m.name.tag: m.display_name for m in experiment.metric_infos}
    assert titles["val/best_miou"] == "best val/miou" and titles["val/miou"] == "final val/miou" and len(titles) <= 6
    assert set(titles) <= scalars and not any(t.startswith("hp/") or t == "epoch" for t in scalars)
    best = [e.value for e in events.Scalars("val/best_miou")]
    assert len(best) == 10 and best == sorted(best)  # the best so far never falls
    assert best[-1] == pytest.approx(read_json(trained_run / "metrics.json")["best"]["val/miou"])


def _opening_columns(experiment: object) -> list[str]:
    """The hyperparameters TensorBoard's HParams table ticks when it opens: its backend's order (flagged `differs`
    first), then its frontend's first five of those flagged."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams.backend_context import _sort_and_reduce_to_hparams_limit

    ordered = api_pb2.Experiment()
    ordered.CopyFrom(experiment)
    _sort_and_reduce_to_hparams_limit(ordered)
    return [info.name for info in ordered.hparam_infos if info.differs][:5]


@pytest.mark.slow
def test_resume_from_last_checkpoint_continues_training(trained_run: Path, shapes_root: Path,
                                                        tmp_path: Path) -> None:
    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, f"data.root={shapes_root}",
                    "optimizer.lr=3e-3", "optimizer.decay=1e-3", "trainer.max_epochs=11", "logger=csv",
                    f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path}")
    metrics = read_json(tmp_path / "metrics.json")
    # only the missing epoch ran, and the history before the resume came back from the checkpoint
    assert [int(h["epoch"]) for h in metrics["history"]] == list(range(11))
    before = read_json(trained_run / "metrics.json")["history"]
    assert metrics["history"][:10] == before
    assert len(metrics["epoch_seconds"]) == 11
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
def test_two_job_multirun_leaves_two_run_dirs_named_by_overrides_in_tensorboard(shapes_root: Path,
                                                                                  tmp_path: Path) -> None:
    run_in_process("train.py", "-m", *TINY_MODEL, *TINY_SHAPES, f"data.root={shapes_root}",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "seed=1,2",
                    f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert len(runs) == 2
    seeds = {OmegaConf.load(r / ".hydra" / "config.yaml").seed for r in runs}
    assert seeds == {1, 2}
    assert all((r / "checkpoints" / "last.ckpt").is_file() for r in runs)
    # TensorBoard over the sweep names each run by what the sweep varies, and shows it in the HParams tab
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    assert set(multiplexer.Runs()) == {"seed=1", "seed=2"}
    assert read_json(runs[0] / "metrics.json")["tensorboard_dir"] == str(tmp_path / "seed=1")
    hparams = multiplexer.PluginRunToTagToContent("hparams")["seed=2"]
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["seed"].number_value == 2
    assert start.session_start_info.hparams["data"].string_value == "shapes"  # the command line's choices too
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {"val/best_miou", "val/best_miou_no_bg"} <= {m.name.tag for m in experiment.metric_infos}
    assert _opening_columns(experiment) == ["loss", "model", "optimizer", "optimizer.lr", "seed"]  # the swept key


@pytest.mark.slow
def test_metrics_json_keeps_the_best_epochs_confusion_matrix(trained_run: Path, tmp_path: Path) -> None:
    metrics = read_json(trained_run / "metrics.json")
    counts = torch.tensor(metrics["best_confusion_matrix"], dtype=torch.float64)
    assert counts.shape == (21, 21) and len(metrics["class_names"]) == 21
    assert counts.sum() == metrics["best"]["val/pixels"]
    assert float(counts.diag().sum() / counts.sum()) == pytest.approx(metrics["best"]["val/acc"], abs=1e-6)
    run_in_process("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'best.ckpt'}", "inference.precision=32-true",
                   f"hydra.run.dir={tmp_path}")
    assert read_json(tmp_path / "metrics.json")["confusion_matrix"] == metrics["best_confusion_matrix"]
    assert (tmp_path / "confusion_matrix.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_bad_checkpoint_path_is_one_clear_error(tmp_path: Path) -> None:
    result = run_in_process("evaluate.py", f"ckpt={tmp_path / 'missing.ckpt'}", f"hydra.run.dir={tmp_path}",
                             check=False)
    assert result.returncode == 2
    assert "missing.ckpt does not exist" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_voc_is_one_clear_error(tmp_path: Path) -> None:
    result = run_in_process("train.py", *TINY_MODEL, *QUIET, f"data.root={tmp_path / 'voc'}",
                             f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert result.returncode == 2
    output = result.stderr + result.stdout
    assert "Pascal VOC 2012 was not found" in output and "data=shapes" in output
    assert "Traceback" not in output and "download=True" not in output  # segx's key is data.download=true


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA GPU")
def test_asking_for_a_missing_gpu_is_one_clear_error(trained_run: Path, tmp_path: Path) -> None:
    result = run_in_process("evaluate.py", f"ckpt={trained_run / 'checkpoints' / 'best.ckpt'}", "device=cuda",
                             f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 2 and "no CUDA GPU" in result.stderr + result.stdout
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_evaluate_at_another_size_or_on_regenerated_shapes_says_so(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    other = run_in_process("evaluate.py", f"ckpt={ckpt}", "data.image_size=48", f"hydra.run.dir={tmp_path / 'a'}")
    assert "Scoring at data.image_size=48 while the network trained at 32" in other.stdout + other.stderr
    assert read_json(tmp_path / "a" / "metrics.json")["n_images"] == 16
    bad = run_in_process("evaluate.py", f"ckpt={ckpt}", "data.image_size=30", f"hydra.run.dir={tmp_path / 'b'}",
                         check=False)
    assert bad.returncode == 2 and "data.image_size=30 cannot be used" in bad.stdout + bad.stderr
    fresh = tmp_path / "fresh-shapes"
    regenerated = run_in_process("evaluate.py", f"ckpt={ckpt}", f"data.root={fresh}", f"hydra.run.dir={tmp_path / 'c'}")
    assert f"data.root={fresh} does not exist: the shapes dataset is generated there anew" in \
        regenerated.stdout + regenerated.stderr
