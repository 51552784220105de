"""`data=folder`: a dataset of one's own (mmsegmentation's layout), index or RGB masks, reduce_zero_label, and every
part of segx (metrics, evaluate, predict, export, report) following the dataset's classes and colours."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segx.core.errors import ConfigError, SegxError
from segx.data.cache import load_or_build
from segx.data.folder import FolderSource
from segx.data.masks import MaskDecoder
from segx.runs.record import read_record
from tests.conftest import QUIET, run_in_process
from tests.folder_data import RGB_COLOURS, write_folder_dataset

TINY = ["model=unet_small", "model.encoder_widths=[8,16]", "model.bottleneck_width=32", "logger=none",
        "trainer.max_epochs=1", "data.image_size=32", "data.batch_size=4", *QUIET]
THREE = ["background", "square", "disc"]


def test_index_masks_with_reduce_zero_label_and_a_label_map_decode_as_mmsegmentation_does() -> None:
    mask = Image.fromarray(np.array([[0, 1, 2, 255], [3, 40, 7, 1]], dtype=np.uint8), mode="L")
    reduced = MaskDecoder.from_config(reduce_zero_label=True).decode(mask)
    assert reduced.tolist() == [[255, 0, 1, 255], [2, 39, 6, 0]]  # 0 is "other": ignored; the rest move down
    mapped = MaskDecoder.from_config(label_map={7: 1, 40: 255}).decode(mask)
    assert mapped.tolist() == [[0, 1, 2, 255], [3, 255, 1, 1]]
    both = MaskDecoder.from_config(label_map={7: 3}, reduce_zero_label=True).decode(mask)
    assert both[1, 2] == 2  # label_map first, then the reduction
    assert MaskDecoder().key == "" and MaskDecoder.from_config(reduce_zero_label=True).key != ""


def test_rgb_masks_map_each_palette_colour_to_its_class_and_name_the_others() -> None:
    decoder = MaskDecoder.from_config("rgb", RGB_COLOURS)
    pixels = np.array([[[0, 0, 0], [200, 30, 30]], [[30, 30, 200], [200, 30, 30]]], dtype=np.uint8)
    assert decoder.decode(Image.fromarray(pixels)).tolist() == [[0, 1], [2, 1]]
    pixels[0, 0] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"colours #010203 \[1, 2, 3\]"):
        decoder.decode(Image.fromarray(pixels))
    with pytest.raises(ConfigError, match="data.mask_format=rgb needs data.palette"):
        MaskDecoder.from_config("rgb")


def test_a_folder_dataset_is_refused_in_one_paragraph_when_its_classes_or_options_are_wrong(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", counts={"train": 2})
    with pytest.raises(ConfigError, match="needs the names of its classes: set data.class_names"):
        FolderSource(root)
    (root / "classes.txt").write_text("background\nsquare\ndisc\n")
    assert FolderSource(root).classes == tuple(THREE)
    (root / "classes.json").write_text(json.dumps({"classes": THREE, "palette": RGB_COLOURS}))
    source = FolderSource(root)
    assert source.palette[1].tolist() == RGB_COLOURS[1] and source.palette[255].tolist() == [224, 224, 192]
    with pytest.raises(ConfigError, match="data.palette has 2 colours for 3 classes"):
        FolderSource(root, palette=RGB_COLOURS[:2])
    with pytest.raises(ConfigError, match="at most 254"):
        FolderSource(root, class_names=[f"c{i}" for i in range(300)])
    with pytest.raises(ConfigError, match="data.label_map: 300: 1 is out of range"):
        FolderSource(root, label_map={300: 1})
    with pytest.raises(ConfigError, match="data.mask_format='colour' is not a choice"):
        FolderSource(root, mask_format="colour")


def test_every_bad_file_is_named_before_any_cache_is_written(tmp_path: Path) -> None:
    """A stray mask, an image without its mask, then (once paired) a corrupt image, a colour outside the palette
    and a mask of another size: each named with its file."""
    root = write_folder_dataset(tmp_path / "data", rgb_masks=True, counts={"train": 6})
    images, masks = root / "images" / "train", root / "annotations" / "train"
    (masks / "train_000.png").rename(masks / "stray.png")
    source = FolderSource(root, class_names=THREE, palette=RGB_COLOURS, mask_format="rgb")
    with pytest.raises(SegxError) as missing:
        source.split_files("train")
    assert "1 image(s) without a mask" in str(missing.value) and "train_000.png" in str(missing.value)
    assert "1 mask(s) without an image" in str(missing.value) and "stray.jpg" in str(missing.value)
    (masks / "stray.png").rename(masks / "train_000.png")
    (images / "train_001.jpg").write_bytes(b"not a jpeg")
    pixels = np.asarray(Image.open(masks / "train_002.png")).copy()
    Image.fromarray(pixels[:10, :10]).save(masks / "train_003.png")
    pixels[0, 0] = (9, 9, 9)
    Image.fromarray(pixels).save(masks / "train_002.png")
    cache = tmp_path / "cache"
    with pytest.raises(SegxError) as bad:
        load_or_build(cache, "train", source.split_files("train"), 32, num_classes=3,
                      bad_files_fix=source.bad_files_fix("train"), decoder=source.mask_decoder)
    message = str(bad.value)
    assert "3 bad file(s), so no cache was written" in message
    assert "train_001.jpg" in message and "colours that are not in data.palette" in message
    assert "train_002.png (colours #090909 [9, 9, 9])" in message and "train_003.png (10x10, image 40x56)" in message
    assert not list(cache.glob("*.pt"))


@pytest.mark.slow
def test_a_three_class_rgb_dataset_of_mixed_sizes_trains_evaluates_predicts_exports_and_reports(tmp_path: Path) -> None:
    from segx.inference.export import export_onnx
    from segx.inference.predict import predict_images
    from segx.report import collect_runs, write_report

    root = write_folder_dataset(tmp_path / "data", rgb_masks=True)
    (root / "classes.json").write_text(json.dumps({"classes": THREE, "palette": RGB_COLOURS}))
    run = tmp_path / "run"
    run_in_process("train.py", "data=folder", f"data.root={root}", "data.mask_format=rgb", *TINY,
                   f"hydra.run.dir={run}")
    record = read_record(run)
    assert record["status"] == "completed" and record["class_names"] == THREE
    assert set(record["best"]) >= {"val/iou/square", "val/iou/disc"}
    ckpt = run / "checkpoints" / "best.ckpt"
    run_in_process("evaluate.py", f"ckpt={ckpt}", "full_res=true", "save_predictions=true",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # At each image's own size: every labelled pixel of the 6 val masks (40×56, 48×48, 64×40 in turn) counted once.
    assert sum(map(sum, scores["confusion_matrix"])) == 2 * (40 * 56 + 48 * 48 + 64 * 40)
    saved = Image.open(tmp_path / "eval" / "predictions" / "val_000.png")
    assert saved.size == (56, 40) and saved.getpalette()[:9] == [c for rgb in RGB_COLOURS for c in rgb]

    predictions = predict_images(ckpt, root / "images" / "val", tmp_path / "pred")
    assert len(predictions.masks) == 6 and Image.open(predictions.masks[2]).size == (40, 64)
    assert Image.open(predictions.masks[0]).getpalette()[3:6] == RGB_COLOURS[1]
    exported = export_onnx(ckpt, tmp_path / "model.onnx")
    import onnx

    metadata = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    assert json.loads(metadata["class_names"]) == THREE and metadata["num_classes"] == "3"
    write_report(collect_runs(run), tmp_path / "report")
    assert "| disc |" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.slow
def test_forty_index_classes_with_zero_as_other_train_with_the_count_from_classes_txt(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", num_classes=40, zero_is_other=True, counts={"train": 8, "val": 4},
                                sizes=((48, 48),))
    (root / "classes.txt").write_text("\n".join(f"class{i}" for i in range(40)) + "\n")
    run = tmp_path / "run"
    refused = run_in_process("train.py", "data=folder", f"data.root={root}", "data.background_index=null",
                             "monitor=val/miou_no_bg", *TINY, f"hydra.run.dir={tmp_path / 'refused'}", check=False)
    assert refused.returncode == 2 and "needs a background class" in refused.stdout + refused.stderr
    # 8 images of up to 3 shapes leave most of the 40 classes undrawn: named in data.absent_classes, knowingly.
    drawn = {int(v) - 1 for p in (root / "annotations" / "train").glob("*.png") for v in np.unique(np.array(
        Image.open(p))) if v}
    absent = [f"class{i}" for i in range(40) if i not in drawn]
    assert absent
    run_in_process("train.py", "data=folder", f"data.root={root}", "data.reduce_zero_label=true",
                   "data.background_index=null", f"data.absent_classes=[{','.join(absent)}]", *TINY,
                   f"hydra.run.dir={run}")
    record = read_record(run)
    assert record["status"] == "completed" and len(record["class_names"]) == 40
    assert [name for name, pixels in record["label_census"]["train"].items() if not pixels] == absent
    assert "val/miou" in record["best"] and "val/miou_no_bg" not in record["best"]  # no background to leave out
    # The top eighth of every mask is "other" (0 in the files): ignored, so fewer pixels are scored than drawn.
    assert record["final"]["val/pixels"] == 4 * (32 * 32 - 32 * 4)
    cached = sorted((root / "segx-cache").glob("val-32px-*.pt"))
    assert len(cached) == 1 and cached[0].stem.count("-") == 3  # the decoding's own key in the name

    from segx.inference.export import export_onnx
    from segx.inference.predict import predict_images
    from segx.report import collect_runs, write_report

    ckpt = run / "checkpoints" / "best.ckpt"
    run_in_process("evaluate.py", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}")
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert len(scores["per_class_iou"]) == 40 and scores["miou_no_bg"] is None
    assert sum(map(sum, scores["confusion_matrix"])) == record["final"]["val/pixels"]  # as training scored it
    assert len(predict_images(ckpt, root / "images" / "val", tmp_path / "pred").masks) == 4
    assert export_onnx(ckpt, tmp_path / "model.onnx").path.is_file()
    write_report(collect_runs(run), tmp_path / "report")
    assert "| class39 |" in (tmp_path / "report" / "report.md").read_text()


def test_the_cityscapes_and_ade20k_presets_read_their_layouts_into_their_train_ids(tmp_path: Path) -> None:
    """A city sub-folder with Cityscapes' file names and label ids (7 road, 26 car, 0 unlabelled); ADE20K's
    training/validation folders with 0 as "other"."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from tests.conftest import ROOT

    city = tmp_path / "cityscapes"
    labels = np.zeros((32, 64), dtype=np.uint8)
    labels[:16], labels[16:, :20] = 7, 26
    for split in ("train", "val"):
        (city / "leftImg8bit" / split / "aachen").mkdir(parents=True)
        (city / "gtFine" / split / "aachen").mkdir(parents=True)
        stem = f"aachen/aachen_000000_00001{9 if split == 'train' else 8}"
        Image.new("RGB", (64, 32), (90, 90, 90)).save(city / "leftImg8bit" / split / f"{stem}_leftImg8bit.png")
        Image.fromarray(labels, mode="L").save(city / "gtFine" / split / f"{stem}_gtFine_labelIds.png")
    ade = tmp_path / "ade"
    scene = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 151  # 0 (other) and classes 1..150
    for split in ("training", "validation"):
        (ade / "images" / split).mkdir(parents=True)
        (ade / "annotations" / split).mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(ade / "images" / split / f"ADE_{split}_00000001.jpg")
        mask = ade / "annotations" / split / f"ADE_{split}_00000001.png"
        Image.fromarray(scene.astype(np.uint8), mode="L").save(mask)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        city_data = instantiate(compose("train", ["data=cityscapes", f"data.root={city}", "data.image_size=32"]).data)
        ade_data = instantiate(compose("train", ["data=ade20k", f"data.root={ade}", "data.image_size=32"]).data)
    assert city_data.num_classes == 19 and city_data.class_names[13] == "car"
    assert city_data.split_files("train").ids == ["aachen/aachen_000000_000019"]
    masks = city_data.load_split("val").masks
    assert sorted(masks.unique().tolist()) == [0, 13, 255]  # road, car, and the unlabelled id ignored
    assert ade_data.num_classes == 150 and ade_data.val_split == "validation"
    values = ade_data.load_split("training").masks.unique().tolist()
    assert 255 in values and max(v for v in values if v != 255) <= 149  # "other" ignored, 1..150 → 0..149


def test_keep_ratio_fits_the_longer_side_and_pads_the_mask_with_the_ignore_index() -> None:
    import torch

    from segx.data.cache import resize_pair, resized_shape

    image = torch.full((3, 30, 60), 200, dtype=torch.uint8)
    mask = torch.ones((1, 30, 60), dtype=torch.uint8)
    assert resized_shape(30, 60, 32, "keep_ratio") == (16, 32) and resized_shape(30, 60, 32) == (32, 32)
    kept_image, kept_mask = resize_pair(image, mask, 32, "keep_ratio")
    assert kept_image.shape == (3, 32, 32) and kept_mask.shape == (1, 32, 32)
    assert (kept_mask[:, :16] == 1).all() and (kept_mask[:, 16:] == 255).all()
    assert (kept_image[:, 16:] == 0).all() and (kept_image[:, :16] > 150).all()


@pytest.mark.slow
def test_keep_ratio_padding_is_never_scored_and_full_resolution_uses_only_the_image(tmp_path: Path) -> None:
    """2:1 images at 32 px: 16 × 32 of each cached mask is the image, the rest padding. Were the padding scored, the
    val pixel count would be 32 × 32 per image."""
    from segx.inference.predict import predict_images

    root = write_folder_dataset(tmp_path / "data", sizes=((24, 48),), counts={"train": 8, "val": 4})
    run = tmp_path / "run"
    run_in_process("train.py", "data=folder", f"data.root={root}", f"data.class_names=[{','.join(THREE)}]",
                   "data.resize=keep_ratio", *TINY, f"hydra.run.dir={run}")
    assert read_record(run)["final"]["val/pixels"] == 4 * 16 * 32
    ckpt = run / "checkpoints" / "best.ckpt"
    run_in_process("evaluate.py", f"ckpt={ckpt}", "full_res=true", f"hydra.run.dir={tmp_path / 'eval'}")
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert sum(map(sum, scores["confusion_matrix"])) == 4 * 24 * 48
    predicted = predict_images(ckpt, root / "images" / "val", tmp_path / "pred")
    assert Image.open(predicted.masks[0]).size == (48, 24)


def test_miou_without_background_leaves_out_the_datasets_background_class_or_is_not_reported() -> None:
    import torch

    from segx.metrics import segmentation_scores

    confmat = torch.tensor([[4.0, 0, 0], [0, 2, 2], [0, 0, 4]])  # IoU 1, 0.5, 2/3
    names = ["a", "b", "c"]
    assert segmentation_scores(confmat, names)["miou_no_bg"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert segmentation_scores(confmat, names, background_index=2)["miou_no_bg"] == pytest.approx(0.75)
    assert segmentation_scores(confmat, names, background_index=None)["miou_no_bg"] is None


def test_a_report_of_a_150_class_dataset_lists_every_class_as_a_row_of_its_heat_map(tmp_path: Path) -> None:
    from segx.report import collect_runs, write_report

    names = [f"class{i}" for i in range(150)]
    for job in range(3):
        best = {"val/miou": 0.3 + job / 10, **{f"val/iou/{n}": (i * 7 + job) % 100 / 100 for i, n in enumerate(names)}}
        (tmp_path / "sweep" / str(job)).mkdir(parents=True)
        (tmp_path / "sweep" / str(job) / "metrics.json").write_text(json.dumps(
            {"status": "completed", "best": best, "overrides": [f"optimizer.lr=1e-{job + 2}"], "class_names": names}))
    report = write_report(collect_runs(tmp_path / "sweep"), tmp_path / "report", roots=[tmp_path / "sweep"])
    heat = next(f for f in report.figures if f.name == "per_class_iou.png")
    width, height = Image.open(heat.path).size
    assert height > 3 * width  # 150 rows of class names, 3 columns of configurations
