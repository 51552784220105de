"""Prediction and ONNX export on a real trained checkpoint, and the safe loader's refusal."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from segx.core.errors import SegxError
from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from segx.inference.evaluate import evaluate_checkpoint
from segx.inference.export import export_checkpoint, export_network, export_onnx
from segx.inference.predict import labels_at_size, predict_images
from segx.models import build_network
from tests.conftest import ROOT, run_in_process

# (file name, PIL mode, (width, height)) of the mixed folder: every kind of image a user may point at.
MIXED = [("photo.jpg", "RGB", (50, 70)), ("cutout.png", "RGBA", (33, 41)), ("scan.png", "L", (64, 64))]


class NotATensor:
    """Pickled into a checkpoint: the weights-only loader must refuse it without running anything."""

    def __init__(self) -> None:
        self.payload = "anything"


def run_all(*commands: tuple[str, ...]) -> list[tuple[int, str]]:
    """Run `python -m <module> key=value ...` for each command (in this process) and collect exit codes and output."""
    results = [run_in_process(*command, check=False) for command in commands]
    return [(result.returncode, result.stdout + result.stderr) for result in results]


@pytest.fixture
def mixed_images(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, mode, (width, height) in MIXED:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(folder / name)
    (folder / "notes.txt").write_text("not an image, and not picked from a folder")
    return folder


def best_ckpt(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "best.ckpt"


# -- predict -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_predict_command_writes_palette_masks_at_each_images_own_size(trained_run: Path, mixed_images: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "masks"
    [(code, output)] = run_all(("segx.cli.predict", f"ckpt={best_ckpt(trained_run)}", f"input={mixed_images}",
                                f"output={out}", "batch_size=2", f"hydra.run.dir={tmp_path / 'hydra'}"))
    assert code == 0, output
    assert f"Wrote 3 mask(s) to {out}" in output
    for name, _, size in MIXED:
        stem = Path(name).stem
        mask = Image.open(out / f"{stem}.png")
        assert mask.mode == "P" and mask.size == size
        assert np.array(mask).max() <= 20
        assert Image.open(out / "overlays" / f"{stem}.jpg").size == (2 * size[0], size[1])
    assert sorted(p.name for p in out.glob("*.png")) == ["cutout.png", "photo.png", "scan.png"]


def test_a_file_a_glob_and_any_batch_size_give_the_same_masks(trained_run: Path, mixed_images: Path,
                                                              tmp_path: Path) -> None:
    # fp32: bf16 kernels may round differently at another batch size
    single = predict_images(best_ckpt(trained_run), mixed_images / "cutout.png", tmp_path / "one", precision="32-true")
    assert [p.name for p in single.masks] == ["cutout.png"] and single.precision == "32-true"
    matched = predict_images(best_ckpt(trained_run), f"{mixed_images}/*.png", tmp_path / "glob", batch_size=1,
                             precision="32-true")
    assert sorted(p.name for p in matched.masks) == ["cutout.png", "scan.png"]
    assert np.array_equal(np.array(Image.open(single.masks[0])), np.array(Image.open(tmp_path / "glob" / "cutout.png")))


def test_predictions_agree_with_the_ground_truth_and_with_full_resolution_evaluation(
        trained_run: Path, shapes_root: Path, tmp_path: Path) -> None:
    voc = shapes_root / "VOCdevkit" / "VOC2012"
    val_ids = (voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    result = predict_images(best_ckpt(trained_run), voc / "JPEGImages", tmp_path / "pred", batch_size=16)
    assert len(result.masks) == len(list((voc / "JPEGImages").glob("*.jpg")))
    correct = labelled = 0
    for image_id in val_ids:
        truth = np.array(Image.open(voc / "SegmentationClass" / f"{image_id}.png"))
        pred = np.array(Image.open(tmp_path / "pred" / f"{image_id}.png"))
        keep = truth != 255
        correct += int((pred[keep] == truth[keep]).sum())
        labelled += int(keep.sum())
    accuracy = correct / labelled
    assert accuracy > 0.5, f"pixel accuracy {accuracy:.3f} of predict on the val images"
    # the same pixels evaluate.py full_res=true scores: preprocessing and upsampling match training's
    scores = evaluate_checkpoint(best_ckpt(trained_run), full_res=True, save_predictions=True, out_dir=tmp_path / "ev")
    assert accuracy == pytest.approx(scores["pixel_acc"], abs=2e-3)
    agree = total = 0
    for image_id in val_ids:
        ours = np.array(Image.open(tmp_path / "pred" / f"{image_id}.png"))
        theirs = np.array(Image.open(tmp_path / "ev" / "predictions" / f"{image_id}.png"))
        agree, total = agree + int((ours == theirs).sum()), total + ours.size
    assert agree / total > 0.999


def test_upsampling_a_few_classes_at_a_time_gives_the_same_labels() -> None:
    logits = torch.randn(21, 8, 10, generator=torch.Generator().manual_seed(0))
    logits[12] = logits[5]  # a tie everywhere: the lower class wins, as with one argmax
    expected = F.interpolate(logits[None], size=(37, 53), mode="bilinear", align_corners=False)[0].argmax(0)
    for max_elements in (37 * 53, 4 * 37 * 53, 1 << 24):
        assert torch.equal(labels_at_size(logits, 37, 53, max_elements=max_elements).long(), expected)


@pytest.mark.slow
def test_bad_inputs_are_one_paragraph_naming_the_culprit_and_write_nothing(trained_run: Path, mixed_images: Path,
                                                                           tmp_path: Path) -> None:
    (mixed_images / "broken.jpg").write_bytes((mixed_images / "photo.jpg").read_bytes()[:200])  # truncated
    (mixed_images / "fake.png").write_text("a text file with an image's name")
    evil = tmp_path / "evil.ckpt"
    torch.save({"segx": {"config": {}}, "state_dict": {}, "extra": NotATensor()}, evil)
    ckpt = best_ckpt(trained_run)
    cases = {
        "missing ckpt": (f"ckpt={tmp_path / 'missing.ckpt'}", f"input={mixed_images}", ["missing.ckpt does not exist"]),
        "empty glob": (f"ckpt={ckpt}", f"input={tmp_path}/nothing/*.jpg", ["nothing/*.jpg matches no file"]),
        "corrupt images": (f"ckpt={ckpt}", f"input={mixed_images}",
                           ["2 of 5 input file(s) are not readable images", "broken.jpg", "fake.png"]),
        "code in ckpt": (f"ckpt={evil}", f"input={mixed_images}",
                         ["evil.ckpt holds Python objects other than tensors", "could run code", "train.py"]),
    }
    outputs = {case: tmp_path / f"out-{i}" for i, case in enumerate(cases)}
    results = run_all(*[("segx.cli.predict", ckpt_arg, input_arg, f"output={outputs[case]}",
                         f"hydra.run.dir={tmp_path / 'hydra' / str(i)}")
                        for i, (case, (ckpt_arg, input_arg, _)) in enumerate(cases.items())])
    for (case, (_, _, expected)), (code, output) in zip(cases.items(), results, strict=True):
        assert code == 2, f"{case}: {output}"
        assert "Traceback" not in output, f"{case}: {output}"
        for text in expected:
            assert text in output, f"{case}: {text!r} not in {output}"
        error_lines = [line for line in output.splitlines() if "[segx][ERROR]" in line]
        assert len(error_lines) == 1, f"{case}: {output}"
        assert not outputs[case].exists(), f"{case} wrote {outputs[case]}"
    assert "weights_only=False" not in results[3][1] and "NotATensor" in results[3][1]


def test_output_that_is_a_file_is_refused(trained_run: Path, mixed_images: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(SegxError, match="exists and is a file"):
        predict_images(best_ckpt(trained_run), mixed_images, taken)
    with pytest.raises(SegxError, match="would overwrite the input image"):
        predict_images(best_ckpt(trained_run), mixed_images, mixed_images)


class RunsAShellCommand:
    """Unpickling this calls os.system: the checkpoint an attacker would hand over."""

    def __reduce__(self) -> tuple:
        return os.system, ("touch /tmp/segx-pwned",)


@pytest.mark.parametrize("payload, named", [(NotATensor, "NotATensor"), (RunsAShellCommand, "system")])
def test_a_checkpoint_holding_a_custom_object_is_refused_without_torchs_advice(payload: type, named: str,
                                                                              tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"segx": {"config": {}}, "state_dict": {}, "extra": payload()}, path)
    with pytest.raises(SegxError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert not Path("/tmp/segx-pwned").exists()
    assert named in message  # the global torch refused (posix.system for a blocked module)
    assert str(path) in message and "holds Python objects other than tensors" in message
    assert "could run code" in message and "segx's train.py" in message
    assert "weights_only=False" not in message and "weights_only" not in message


def test_a_text_file_as_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "notes.ckpt"
    path.write_text("hello")
    with pytest.raises(SegxError, match="could not be read safely"):
        load_checkpoint(path)


# -- export --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_export_command_writes_a_verified_dynamic_onnx_model(trained_run: Path, tmp_path: Path) -> None:
    model_path = tmp_path / "export" / "model.onnx"
    [(code, output)] = run_all(("segx.cli.export", f"ckpt={best_ckpt(trained_run)}", "format=onnx",
                                f"output={model_path}", f"hydra.run.dir={tmp_path / 'hydra'}"))
    assert code == 0, output
    differences = [float(d) for d in re.findall(r"max abs difference ([0-9.e+-]+)", output)]
    assert len(differences) == 3 and max(differences) < 1e-3, output  # two shapes, then the overall line
    assert "[1, 3, 64, 64]" in output and "[2, 3, 100, 120]" in output
    assert model_path.is_file() and not [p for p in model_path.parent.iterdir() if p != model_path]

    metadata = {p.key: p.value for p in onnx.load(str(model_path)).metadata_props}
    assert metadata["size_divisor"] == "4" and metadata["image_size"] == "32"
    assert metadata["mean"] == "[0.485, 0.456, 0.406]"
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(3))  # a third size and batch
    (logits,) = session.run(None, {"image": x.numpy()})
    with torch.inference_mode():
        expected = network_from_checkpoint(load_checkpoint(best_ckpt(trained_run))).eval()(x).numpy()
    assert logits.shape == (3, 21, 48, 80)
    assert np.abs(logits - expected).max() < 1e-3


def test_formats_other_than_onnx_are_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(SegxError, match="format=torchscript is not supported; segx exports format=onnx only"):
        export_checkpoint(tmp_path / "not-even-read.ckpt", tmp_path / "model.pt", format="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_an_export_that_misses_the_tolerance_writes_nothing(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(SegxError, match="does not reproduce PyTorch"):
        export_onnx(best_ckpt(trained_run), tmp_path / "model.onnx", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp file


EXPORTED = [
    ("unet", ["model.encoder_widths=[8,16,32,64]", "model.bottleneck_width=32"]),
    ("fcn", ["model.widths=[8,16,16,32]", "model.fc_width=32"]),
    ("pspnet", ["model.widths=[8,16,32,64]", "model.head_channels=32"]),  # adaptive pooling at any size
    ("resunet", ["model.widths=[8,16,32,64]"]),
    ("pspnet_resnet", ["model.encoder=resnet18"]),  # smp: pads to its stride, PSP blocks
]
# (size_divisor, pads_input) of each network above, as the export reports and records them.
EXPORT_CONTRACT = {"unet": (16, False), "fcn": (16, False), "pspnet": (1, False), "resunet": (8, False),
                   "pspnet_resnet": (8, True)}


@pytest.mark.parametrize("model, overrides", EXPORTED)
def test_every_architecture_exports_with_dynamic_sizes(model: str, overrides: list[str], tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", *overrides])
    torch.manual_seed(0)
    net = build_network(cfg.model).eval()
    report = export_network(net, tmp_path / f"{model}.onnx")
    # A network that pads its input is checked once more, where the pad reaches the input's size.
    assert report.path.is_file() and len(report.differences) == (3 if report.pads_input else 2)
    assert report.max_abs_difference < 1e-3, report.differences
    shapes = [shape for shape, _ in report.differences]
    assert shapes[0][0] == 1 and shapes[1][0] == 2 and shapes[0][2:] != shapes[1][2:]
    assert all(side % report.input_multiple == 0 for shape in shapes for side in shape[2:])
    assert (report.size_divisor, report.pads_input) == EXPORT_CONTRACT[model]
