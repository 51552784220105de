"""`data=voc_aug`: VOC 2012 + SBD trainaug, on a fabricated VOC tree and SBD tree with overlapping ids."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segx.core.errors import DatasetUnavailableError
from segx.data.voc_aug import AUG_DIR, SBD_PAGE, VOCAugSource, trainaug_ids
from segx.data.voc_classes import VOC_PALETTE
from segx.runs.record import read_record
from tests.conftest import QUIET, run_in_process

scipy_io = pytest.importorskip("scipy.io", reason="data=voc_aug reads SBD's .mat masks with scipy")

VOC_TRAIN, VOC_VAL = ["a", "b", "c"], ["d", "e"]
SBD_TRAIN, SBD_VAL = ["b", "f", "g", "d"], ["h", "e"]
TRAIN_AUG = ["a", "b", "c", "f", "g", "h"]  # (VOC train ∪ SBD train ∪ SBD val) − VOC val
IN_VOC_JPEGS = ["a", "b", "c", "d", "e", "f"]  # f is SBD-only but VOC holds its image, as VOC2012 does most of SBD's
HEIGHT, WIDTH = 48, 64


def _labels(cls: int, border: bool) -> np.ndarray:
    """A box of class `cls` on background; with `border`, VOC's 255 ring around it."""
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[10:30, 8 + cls:40 + cls] = cls
    if border:
        labels[9, 7 + cls:41 + cls] = labels[30, 7 + cls:41 + cls] = 255
        labels[9:31, 7 + cls] = labels[9:31, 40 + cls] = 255
    return labels


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))


def _palette_png(labels: np.ndarray, path: Path) -> None:
    image = Image.frombytes("P", (WIDTH, HEIGHT), labels.tobytes())
    image.putpalette(VOC_PALETTE.tobytes())
    image.save(path)


def sbd_mask(sample_id: str) -> np.ndarray:
    """SBD's mask of an id: another class than VOC's mask of it, and no 255."""
    return _labels(1 + (ord(sample_id) * 7) % 20, border=False)


def write_voc_and_sbd(root: Path, sbd_root: Path | None = None) -> Path:
    """A VOC 2012 tree under `root` and SBD's benchmark_RELEASE/dataset (at `sbd_root`, else its default place)."""
    voc = root / "VOCdevkit" / "VOC2012"
    lists = voc / "ImageSets" / "Segmentation"
    for folder in (voc / "JPEGImages", voc / "SegmentationClass", lists):
        folder.mkdir(parents=True)
    for index, sample_id in enumerate(VOC_TRAIN + VOC_VAL):
        _palette_png(_labels(1 + index, border=True), voc / "SegmentationClass" / f"{sample_id}.png")
    for sample_id in IN_VOC_JPEGS:
        _image(ord(sample_id)).save(voc / "JPEGImages" / f"{sample_id}.jpg", quality=90)
    for name, ids in (("train", VOC_TRAIN), ("val", VOC_VAL), ("trainval", VOC_TRAIN + VOC_VAL)):
        (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    sbd = sbd_root or root / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "img").mkdir()
    for sample_id in SBD_TRAIN + SBD_VAL:
        _image(ord(sample_id)).save(sbd / "img" / f"{sample_id}.jpg", quality=90)
        gt = {"Segmentation": sbd_mask(sample_id), "Boundaries": [], "CategoriesPresent": []}
        scipy_io.savemat(sbd / "cls" / f"{sample_id}.mat", {"GTcls": gt})
    (sbd / "train.txt").write_text("".join(f"{i}\n" for i in SBD_TRAIN))
    (sbd / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    return sbd


def test_train_aug_is_voc_train_with_sbd_less_voc_val_each_id_from_the_right_files(tmp_path: Path) -> None:
    sbd = write_voc_and_sbd(tmp_path)
    stored = scipy_io.loadmat(sbd / "cls" / "g.mat", struct_as_record=False, squeeze_me=True)["GTcls"].Segmentation
    assert np.array_equal(stored, sbd_mask("g"))  # the fabricated .mat reads back as SBD's do
    assert trainaug_ids(VOC_TRAIN, VOC_VAL, SBD_TRAIN, SBD_VAL) == TRAIN_AUG
    source = VOCAugSource(tmp_path)
    files = source.split_files("train_aug")
    assert files.ids == sorted((set(VOC_TRAIN) | set(SBD_TRAIN) | set(SBD_VAL)) - set(VOC_VAL)) == TRAIN_AUG
    assert not set(files.ids) & set(VOC_VAL)
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    by_id = dict(zip(files.ids, zip(files.images, files.masks, strict=True), strict=True))
    for sample_id, (image, mask) in by_id.items():
        folder = voc / "JPEGImages" if sample_id in IN_VOC_JPEGS else sbd / "img"
        assert image == str(folder / f"{sample_id}.jpg"), sample_id
        with Image.open(mask) as png:
            assert png.mode == "P" and png.getpalette()[:63] == VOC_PALETTE[:21].flatten().tolist()
            pixels = np.asarray(png)
        if sample_id in VOC_TRAIN:  # VOC's own mask, 255 borders and all, even where SBD has one too (b)
            assert mask == str(voc / "SegmentationClass" / f"{sample_id}.png")
            assert 255 in pixels and not np.array_equal(pixels, sbd_mask(sample_id))
        else:  # converted from SBD's .mat, pixel for pixel
            assert mask == str(tmp_path / AUG_DIR / f"{sample_id}.png")
            assert np.array_equal(pixels, sbd_mask(sample_id))
    assert sorted(p.name for p in (tmp_path / AUG_DIR).glob("*.png")) == ["f.png", "g.png", "h.png"]
    assert source.split_files("val").ids == VOC_VAL
    assert source.bad_files_fix("train_aug").count(str(sbd)) == 3  # cls/, train.txt, val.txt


def test_sbd_masks_are_converted_once_and_a_deleted_one_again(tmp_path: Path) -> None:
    write_voc_and_sbd(tmp_path)
    VOCAugSource(tmp_path).prepare()
    converted = sorted((tmp_path / AUG_DIR).glob("*.png"))
    assert [p.stem for p in converted] == ["f", "g", "h"]
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in converted}  # a rewrite is a new inode
    source = VOCAugSource(tmp_path)  # a second run (a sweep's next job)
    source.prepare()
    files = source.split_files("train_aug")
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in converted} == before
    (tmp_path / AUG_DIR / "g.png").unlink()
    assert source.split_files("train_aug") == files
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in converted}
    assert after["f.png"] == before["f.png"] and after["h.png"] == before["h.png"]  # only g converted again
    assert np.array_equal(np.asarray(Image.open(tmp_path / AUG_DIR / "g.png")), sbd_mask("g"))
    assert not list((tmp_path / AUG_DIR).glob(".*.tmp"))


def test_missing_sbd_is_one_paragraph_naming_each_path_and_val_needs_no_sbd(tmp_path: Path) -> None:
    write_voc_and_sbd(tmp_path)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    shutil.rmtree(tmp_path / "benchmark_RELEASE")
    source = VOCAugSource(tmp_path)
    source.prepare()  # nothing to convert without SBD, and nothing to complain about for val
    assert source.split_files("val").ids == VOC_VAL
    with pytest.raises(DatasetUnavailableError) as caught:
        source.split_files("train_aug")
    message = str(caught.value)
    assert "\n" not in message
    for path in (sbd / "cls", sbd / "train.txt", sbd / "val.txt"):
        assert str(path) in message
    assert SBD_PAGE in message and "benchmark.tgz" in message and "data.sbd_root" in message
    assert not (tmp_path / AUG_DIR).exists()

    elsewhere = tmp_path / "sbd-copy"  # data.sbd_root pointing at another place, with one part missing
    shutil.rmtree(tmp_path / "VOCdevkit")
    write_voc_and_sbd(tmp_path, sbd_root=elsewhere)
    (elsewhere / "val.txt").unlink()
    with pytest.raises(DatasetUnavailableError, match="is missing") as caught:
        VOCAugSource(tmp_path, sbd_root=elsewhere).split_files("train_aug")
    assert str(elsewhere / "val.txt") in str(caught.value) and str(elsewhere / "cls") not in str(caught.value)
    (elsewhere / "val.txt").write_text("".join(f"{i}\n" for i in SBD_VAL))
    assert VOCAugSource(tmp_path, sbd_root=elsewhere).split_files("train_aug").ids == TRAIN_AUG


def test_unreadable_mat_files_are_all_named_in_one_error_and_the_good_ones_converted(tmp_path: Path) -> None:
    sbd = write_voc_and_sbd(tmp_path)
    (sbd / "cls" / "g.mat").write_bytes(b"not a MATLAB file at all")
    (sbd / "cls" / "h.mat").write_bytes(b"")
    with pytest.raises(DatasetUnavailableError) as caught:
        VOCAugSource(tmp_path).prepare()
    message = str(caught.value)
    assert message.startswith("2 SBD mask(s)") and "g.mat" in message and "h.mat" in message
    assert str(sbd / "cls" / "g.mat") in message and "\n" not in message
    assert [p.name for p in (tmp_path / AUG_DIR).glob("*.png")] == ["f.png"]
    assert not list((tmp_path / AUG_DIR).glob(".*.tmp"))  # no half-written PNG left behind

    (sbd / "cls" / "h.mat").unlink()  # a listed id with no mask anywhere: named with both places
    with pytest.raises(DatasetUnavailableError, match=r"1 mask\(s\) in neither .* \(<id>\.mat\): h\b"):
        VOCAugSource(tmp_path).split_files("train_aug")


def test_the_count_is_logged_and_a_real_size_tree_off_10582_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_voc_and_sbd(tmp_path)
    with caplog.at_level(logging.INFO, logger="segx.data.voc_aug"):
        VOCAugSource(tmp_path).split_files("train_aug")
    assert any("trainaug: 6 ids" in r.getMessage() for r in caplog.records)
    assert not any(r.levelno >= logging.WARNING for r in caplog.records)  # not the real data: no count to match

    voc = tmp_path / "VOCdevkit" / "VOC2012"
    ids = [f"2007_{i:06d}" for i in range(1464)]  # VOC train's real size (empty files: only listed, not decoded)
    for sample_id in ids:
        (voc / "JPEGImages" / f"{sample_id}.jpg").touch()
        (voc / "SegmentationClass" / f"{sample_id}.png").touch()
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="segx.data.voc_aug"):
        files = VOCAugSource(tmp_path).split_files("train_aug")
    assert len(files.ids) == 1464 + 4  # + SBD's f, g, h and b (b is no longer in VOC train)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "1468 ids, not the published 10582" in warnings[0]


def test_a_failed_sbd_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    write_voc_and_sbd(tmp_path)
    shutil.rmtree(tmp_path / "benchmark_RELEASE")
    calls = []

    def no_internet(root: str, **kwargs: object) -> None:
        calls.append((root, kwargs))
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "SBDataset", no_internet)
    with pytest.raises(DatasetUnavailableError, match="Downloading SBD into data.sbd_root=.* failed") as caught:
        VOCAugSource(tmp_path, download=True).prepare()
    assert "name resolution" in str(caught.value) and "data.download=false" in str(caught.value)
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    assert calls == [(str(sbd), {"image_set": "train", "mode": "segmentation", "download": True})]


@pytest.mark.slow
def test_train_and_evaluate_on_voc_aug(tmp_path: Path) -> None:
    root, run = tmp_path / "voc", tmp_path / "run"
    write_voc_and_sbd(root)
    run_in_process("train.py", "data=voc_aug", f"data.root={root}", "data.image_size=32", "data.batch_size=4",
                   "model=unet_small", "model.encoder_widths=[8,16]", "model.bottleneck_width=32", "logger=none",
                   "trainer.max_epochs=1", "trainer.accelerator=cpu", *QUIET,
                   "data.absent_classes=any", f"hydra.run.dir={run}")  # 6 images show a few of the 21 classes
    assert read_record(run)["status"] == "completed"
    cached = {p.name.split("-")[0] for p in (root / "segx-cache").glob("*.pt")}
    assert cached == {"train_aug", "val"}
    run_in_process("evaluate.py", f"ckpt={run}/checkpoints/best.ckpt", "device=cpu",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scores["n_images"] == len(VOC_VAL) and scores["split"] == "val"
    assert os.path.isfile(root / AUG_DIR / "h.png")

    from segx.inference.export import export_onnx
    from segx.inference.predict import predict_images
    from segx.report import collect_runs, write_report

    ckpt = run / "checkpoints" / "best.ckpt"
    images = root / "VOCdevkit" / "VOC2012" / "JPEGImages"
    assert len(predict_images(ckpt, images, tmp_path / "pred").masks) == len(list(images.glob("*.jpg")))
    assert export_onnx(ckpt, tmp_path / "model.onnx").path.is_file()
    write_report(collect_runs(run), tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "data=voc_aug" in report and "| aeroplane |" in report
