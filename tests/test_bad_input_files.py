"""Bad input data: every bad file is listed in one message, nothing is cached, the entry point exits 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segx.core.errors import SegxError
from segx.data import VOCDataModule
from tests.conftest import run_in_process

HEIGHT, WIDTH = 24, 32
TINY_RUN = ["model=unet_small", "model.encoder_widths=[8,16]", "model.bottleneck_width=32", "data.image_size=32",
            "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]


def write_tree(root: Path, num_train: int = 16, num_val: int = 4) -> Path:
    """A tiny VOC 2012 layout: 24x32 noise JPEGs and palette masks holding a few classes and void."""
    voc_dir = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc_dir / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {"train": [f"2007_{i:06d}" for i in range(num_train)],
              "val": [f"2008_{i:06d}" for i in range(num_val)]}
    for split, ids in splits.items():
        for i, sample_id in enumerate(ids):
            pixels = rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(voc_dir / "JPEGImages" / f"{sample_id}.jpg", quality=90)
            write_mask(voc_dir / "SegmentationClass" / f"{sample_id}.png", [0, 1 + i % 20, 255])
        (voc_dir / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    (voc_dir / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
        "".join(f"{i}\n" for ids in splits.values() for i in ids))
    return voc_dir


def write_mask(path: Path, values: list[int], height: int = HEIGHT, width: int = WIDTH) -> None:
    labels = np.zeros((height, width), dtype=np.uint8)
    for k, value in enumerate(values):
        labels[:, k * width // len(values):] = value
    mask = Image.fromarray(labels, mode="L").convert("P")
    mask.putpalette([c for i in range(256) for c in (i, i, i)])
    mask.save(path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def leftovers(root: Path) -> list[str]:
    """Cache and temp files (the lock files may stay: they are empty and reused)."""
    cache = root / "segx-cache"
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


def load_error(root: Path, split: str = "train") -> str:
    with pytest.raises(SegxError) as error:
        VOCDataModule(root=str(root), image_size=32).load_split(split)
    message = str(error.value)
    assert "\n" not in message  # one paragraph
    return message


def test_a_truncated_jpeg_is_named_not_a_traceback(tmp_path: Path) -> None:
    voc_dir = write_tree(tmp_path)
    truncate(voc_dir / "JPEGImages" / "2007_000003.jpg")
    message = load_error(tmp_path)
    assert "The train split has 1 bad file(s), so no cache was written: 1 image(s) that cannot be decoded " \
           f"(truncated or corrupt JPEG) in {voc_dir / 'JPEGImages'}: 2007_000003.jpg (the first says: " in message
    assert "truncated" in message.split("the first says:")[1]
    assert f"{voc_dir}/ImageSets/Segmentation/train.txt" in message
    assert leftovers(tmp_path) == []


def test_a_file_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    voc_dir = write_tree(tmp_path)
    (voc_dir / "JPEGImages" / "2007_000001.jpg").write_bytes(b"<html>not found</html>")
    (voc_dir / "SegmentationClass" / "2007_000002.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    message = load_error(tmp_path)
    assert "1 image(s) that cannot be decoded (truncated or corrupt JPEG)" in message
    assert "2007_000001.jpg (the first says: UnidentifiedImageError" in message
    assert "1 mask(s) that cannot be decoded (truncated or corrupt PNG)" in message and "2007_000002.png" in message
    assert leftovers(tmp_path) == []


def test_mask_values_outside_the_classes_are_caught_before_the_cache(tmp_path: Path) -> None:
    voc_dir = write_tree(tmp_path)
    write_mask(voc_dir / "SegmentationClass" / "2007_000004.png", [0, 21, 255])
    write_mask(voc_dir / "SegmentationClass" / "2007_000005.png", [3, 37, 200])
    message = load_error(tmp_path)
    assert ("2 mask(s) with values outside the classes (0..20 and 255 are allowed) in "
            f"{voc_dir / 'SegmentationClass'}: 2007_000004.png (values 21), "
            "2007_000005.png (values 37, 200)") in message
    assert leftovers(tmp_path) == []
    # the check follows data.num_classes: with 3 classes, label 3 of a good mask is out of range too
    three = VOCDataModule(root=str(tmp_path), image_size=32, num_classes=3, class_names=["a", "b", "c"])
    with pytest.raises(SegxError, match=r"\(0\.\.2 and 255 .*2008_000002\.png \(values 3\), 2008_000003\.png \(va"):
        three.load_split("val")


def test_a_mask_of_another_size_or_mode_is_named(tmp_path: Path) -> None:
    voc_dir = write_tree(tmp_path)
    write_mask(voc_dir / "SegmentationClass" / "2007_000006.png", [0, 5], height=HEIGHT, width=WIDTH - 2)
    Image.new("RGB", (WIDTH, HEIGHT)).save(voc_dir / "SegmentationClass" / "2007_000007.png")
    message = load_error(tmp_path)
    assert "1 mask(s) whose height and width differ from their image's" in message
    assert "2007_000006.png (24x30, image 24x32)" in message
    assert "1 mask(s) that are not index images" in message and "2007_000007.png (mode RGB)" in message
    assert leftovers(tmp_path) == []


def test_a_one_pair_split_decodes_then_names_its_truncated_image_in_one_paragraph(tmp_path: Path) -> None:
    voc_dir = write_tree(tmp_path, num_train=1, num_val=1)
    image = voc_dir / "JPEGImages" / "2007_000000.jpg"
    assert VOCDataModule(root=str(tmp_path), image_size=16).load_split("train").images.shape == (1, 3, 16, 16)
    truncate(image)
    with pytest.raises(SegxError, match="2007_000000.jpg") as error:
        VOCDataModule(root=str(tmp_path), image_size=16).load_split("train")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_the_entry_point_lists_ten_bad_files_and_counts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    voc_dir = write_tree(root, num_train=16, num_val=4)
    bad_images = sorted(f"2007_{i:06d}.jpg" for i in range(12))
    for name in bad_images:
        truncate(voc_dir / "JPEGImages" / name)
    write_mask(voc_dir / "SegmentationClass" / "2007_000014.png", [0, 99])
    result = run_in_process("train.py", *TINY_RUN, f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}",
                             check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert ("The train split has 13 bad file(s), so no cache was written: 12 image(s) that cannot be decoded "
            f"(truncated or corrupt JPEG) in {voc_dir / 'JPEGImages'}: "
            f"{', '.join(bad_images[:10])} and 2 more") in output
    assert bad_images[10] not in output and bad_images[11] not in output
    assert "1 mask(s) with values outside the classes (0..20 and 255 are allowed)" in output
    assert "2007_000014.png (values 99)" in output
    assert list((root / "segx-cache").glob("*.pt")) == [] and leftovers(root) == []


@pytest.mark.slow
def test_the_entry_point_names_a_missing_split_file(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    voc_dir = write_tree(root, num_train=2, num_val=2)
    split_file = voc_dir / "ImageSets" / "Segmentation" / "train.txt"
    split_file.unlink()
    result = run_in_process("train.py", *TINY_RUN, f"data.root={root}", f"hydra.run.dir={tmp_path / 'run'}",
                             check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert f"{split_file} (the train split file, one image id per line) is missing" in output
    assert not (root / "segx-cache").exists()
