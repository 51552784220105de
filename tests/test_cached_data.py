"""VOC reading, the cached tensor store, batching and augmentation, on a shapes tree the tests write."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segx.core.errors import SegxError
from segx.data import VOCDataModule
from segx.data.augment import BatchAugment
from segx.data.cache import CACHE_FORMAT
from segx.data.datamodule import voc_split_files
from segx.data.shapes import write_shapes_dataset


@pytest.fixture()
def voc_copy(shapes_root: Path, tmp_path: Path) -> Path:
    """A private copy of the session's shapes tree, free to damage."""
    shutil.copytree(shapes_root / "VOCdevkit", tmp_path / "VOCdevkit")
    return tmp_path


def cache_files(root: Path) -> list[Path]:
    return sorted((root / "segx-cache").glob("*.pt"))


def test_cache_build_matches_the_source_files(voc_copy: Path) -> None:
    dm = VOCDataModule(root=str(voc_copy), image_size=32)
    cached = dm.load_split("val")
    ids, images, masks = voc_split_files(voc_copy, "val")
    assert cached.ids == ids and len(cached) == 16
    assert cached.images.shape == (16, 3, 32, 32) and cached.images.dtype == torch.uint8
    assert cached.masks.shape == (16, 32, 32) and cached.masks.dtype == torch.uint8
    for i in (0, 5):
        original = np.array(Image.open(masks[i]))
        assert tuple(cached.original_sizes[i].tolist()) == original.shape
        # nearest-neighbour resizing only ever copies labels, and keeps the 255 void label
        assert set(cached.masks[i].unique().tolist()) <= set(np.unique(original).tolist())
    assert (cached.masks == 255).any()
    assert cache_files(voc_copy)[0].name.startswith("val-32px-")


def test_second_load_reuses_the_cache(voc_copy: Path) -> None:
    first = VOCDataModule(root=str(voc_copy), image_size=32).load_split("train")
    [path] = cache_files(voc_copy)
    mtime = path.stat().st_mtime_ns
    second = VOCDataModule(root=str(voc_copy), image_size=32).load_split("train")
    assert path.stat().st_mtime_ns == mtime  # not rewritten
    assert torch.equal(first.images, second.images) and torch.equal(first.masks, second.masks)


def test_changed_file_list_or_size_gets_a_new_cache(voc_copy: Path) -> None:
    VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    VOCDataModule(root=str(voc_copy), image_size=48).load_split("val")
    split_file = voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    ids = split_file.read_text().split()
    split_file.write_text("\n".join(ids[:-1]) + "\n")
    shorter = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    assert len(shorter) == len(ids) - 1
    assert len(cache_files(voc_copy)) == 3


def test_a_failed_build_leaves_no_cache_file_behind(voc_copy: Path) -> None:
    ids, images, _ = voc_split_files(voc_copy, "val")
    Path(images[3]).write_bytes(b"not a jpeg")  # same name, different size: a new fingerprint
    with pytest.raises(SegxError, match=rf"1 image\(s\) that cannot be decoded.*{Path(images[3]).name}"):
        VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    leftovers = [p for p in (voc_copy / "segx-cache").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []


def test_an_unreadable_cache_is_rebuilt(voc_copy: Path) -> None:
    good = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    [path] = cache_files(voc_copy)
    path.write_bytes(b"truncated")
    again = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    assert torch.equal(good.images, again.images)


def test_a_cache_truncated_to_half_is_rebuilt_with_a_warning(
    voc_copy: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    good = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    [path] = cache_files(voc_copy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.INFO, logger="segx.data.cache"):
        again = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    assert any(r.levelno == logging.WARNING and "rebuilding" in r.getMessage() for r in caplog.records)
    assert any("Building the val cache" in r.getMessage() for r in caplog.records)
    assert torch.equal(good.images, again.images) and torch.equal(good.masks, again.masks)
    assert torch.equal(good.original_sizes, again.original_sizes) and good.ids == again.ids
    assert path.stat().st_size == len(data)  # the rebuilt file is whole again
    third = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")  # and now simply loads
    assert torch.equal(good.masks, third.masks)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda blob: {**blob, "format": 0}, "format 0"),
        (lambda blob: {k: v for k, v in blob.items() if k != "masks"}, "masks"),
        (lambda blob: {**blob, "images": blob["images"][:-1]}, "images"),
        (lambda blob: {**blob, "masks": blob["masks"].long()}, "masks"),
        (lambda blob: {**blob, "original_sizes": blob["original_sizes"][:, :1]}, "original_sizes"),
    ],
    ids=["format-0", "missing-key", "short-images", "wrong-dtype", "wrong-shape"],
)
def test_a_cache_from_another_version_is_rebuilt(
    voc_copy: Path, caplog: pytest.LogCaptureFixture, damage: object, reason: str,
) -> None:
    good = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    [path] = cache_files(voc_copy)
    blob = torch.load(path, weights_only=True)
    torch.save(damage(blob), path)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="segx.data.cache"):
        again = VOCDataModule(root=str(voc_copy), image_size=32).load_split("val")
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "rebuilding" in warning and reason in warning
    assert torch.equal(good.images, again.images) and torch.equal(good.masks, again.masks)
    assert torch.load(path, weights_only=True)["format"] == CACHE_FORMAT


# Each builder waits at a file barrier, then calls load_or_build; it prints BUILT when it logged a build.
BUILDER = """
import logging, sys, time
from pathlib import Path
from segx.data.cache import load_or_build
from segx.data.datamodule import voc_split_files

root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
ids, images, masks = voc_split_files(root, "train")
built = []
class Seen(logging.Handler):
    def emit(self, record):
        if record.getMessage().startswith("Building the"):
            built.append(record)
logging.getLogger("segx.data.cache").addHandler(Seen())
logging.getLogger("segx.data.cache").setLevel(logging.INFO)
(root / me).touch()
deadline = time.monotonic() + 60
while not (root / other).exists() and time.monotonic() < deadline:
    time.sleep(0.002)
cached = load_or_build(root / "segx-cache", "train", ids, images, masks, 32)
print("BUILT" if built else "LOADED", int(cached.images.sum()), int(cached.masks.sum()))
"""


def test_concurrent_builders_share_one_cache(voc_copy: Path) -> None:
    """Two processes released at the same instant: under the lock one builds and the other waits and loads.
    Without the lock both find no cache and both build (checked by removing it: this test then fails)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", BUILDER, str(voc_copy), f"ready-{me}", f"ready-{1 - me}"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for me in (0, 1)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    reports = [out.split() for out, _ in outputs]
    assert sorted(r[0] for r in reports) == ["BUILT", "LOADED"], outputs
    assert reports[0][1:] == reports[1][1:]  # the same tensors
    assert len(cache_files(voc_copy)) == 1
    assert not list((voc_copy / "segx-cache").glob("*.tmp"))


def test_missing_dataset_is_a_clear_error(tmp_path: Path) -> None:
    dm = VOCDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(SegxError, match=r"data\.root=.*nowhere.*data=shapes"):
        dm.load_split("train")


def test_a_root_without_vocdevkit_says_so_and_spots_a_root_one_level_too_deep(voc_copy: Path) -> None:
    empty = voc_copy / "empty"
    empty.mkdir()
    with pytest.raises(SegxError, match=r"data\.root=.*empty exists but holds no VOCdevkit/VOC2012") as error:
        VOCDataModule(root=str(empty)).load_split("train")
    assert "data=shapes" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(SegxError, match=rf"points at the VOC2012 folder itself: set data\.root={voc_copy}\."):
        VOCDataModule(root=str(voc_copy / "VOCdevkit" / "VOC2012")).load_split("train")
    with pytest.raises(SegxError, match=rf"points at VOCdevkit: set data\.root={voc_copy}\."):
        VOCDataModule(root=str(voc_copy / "VOCdevkit")).load_split("train")


@pytest.mark.parametrize(
    ("part", "what"),
    [
        ("ImageSets/Segmentation/val.txt", "the val split file, one image id per line"),
        ("JPEGImages", "folder of the <id>.jpg images"),
        ("SegmentationClass", "folder of the <id>.png class masks"),
    ],
)
def test_a_voc_tree_missing_a_part_names_that_path(voc_copy: Path, part: str, what: str) -> None:
    voc_dir = voc_copy / "VOCdevkit" / "VOC2012"
    target = voc_dir / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(SegxError) as error:
        VOCDataModule(root=str(voc_copy)).load_split("val")
    message = str(error.value)
    assert f"{target} ({what}) is missing" in message, message
    assert "VOCtrainval_11-May-2012.tar" in message and "\n" not in message
    assert not (voc_copy / "segx-cache").exists()


def test_missing_image_file_is_named(voc_copy: Path) -> None:
    _, images, _ = voc_split_files(voc_copy, "val")
    os.remove(images[2])
    with pytest.raises(SegxError, match=Path(images[2]).name):
        VOCDataModule(root=str(voc_copy)).load_split("val")


def test_many_missing_files_are_listed_ten_by_name_then_counted(voc_copy: Path) -> None:
    _, images, masks = voc_split_files(voc_copy, "train")
    for path in images[:13]:
        os.remove(path)
    os.remove(masks[50])
    with pytest.raises(SegxError) as error:
        VOCDataModule(root=str(voc_copy)).load_split("train")
    message = str(error.value)
    assert "lists 14 id(s) whose files do not exist: 13 image(s) missing from" in message
    names = sorted(Path(p).name for p in images[:13])
    assert ", ".join(names[:10]) + " and 3 more" in message
    assert names[10] not in message
    assert f"1 mask(s) missing from {Path(masks[50]).parent}: {Path(masks[50]).name}" in message
    assert "ImageSets/Segmentation/train.txt" in message


def test_shuffling_follows_the_seed(shapes_root: Path) -> None:
    def first_batch(seed: int) -> torch.Tensor:
        dm = VOCDataModule(root=str(shapes_root), image_size=32, batch_size=8, seed=seed)
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_batches_are_uint8_slices_and_normalised_after_transfer(shapes_root: Path) -> None:
    dm = VOCDataModule(root=str(shapes_root), image_size=32, batch_size=8)
    images, masks = next(iter(dm.val_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32) and masks.shape == (8, 32, 32)
    x, y = dm.on_after_batch_transfer((images, masks), 0)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.allclose(dm.denormalize(x), images.float() / 255, atol=1e-6)


def test_class_frequencies_sum_to_one_and_ignore_void(shapes_root: Path) -> None:
    dm = VOCDataModule(root=str(shapes_root), image_size=32)
    freq = dm.class_frequencies()
    masks = dm.load_split("train").masks
    assert freq.shape == (21,) and torch.isclose(freq.sum(), torch.tensor(1.0, dtype=freq.dtype))
    assert float(freq[0]) == pytest.approx(float((masks == 0).sum() / (masks != 255).sum()))


def test_flip_moves_image_and_mask_together() -> None:
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    masks = torch.arange(2 * 4 * 4).view(2, 4, 4)
    out_images, out_masks = BatchAugment(hflip=True, seed=3)(images, masks)
    for i in range(2):
        flipped = not torch.equal(out_masks[i], masks[i])
        assert torch.equal(out_masks[i], masks[i].flip(-1) if flipped else masks[i])
        assert torch.equal(out_images[i], images[i].flip(-1) if flipped else images[i])
    same = [BatchAugment(hflip=True, seed=3)(images, masks)[1] for _ in range(2)]
    assert torch.equal(same[0], same[1])


def test_scale_crop_keeps_size_and_pads_labels_with_void() -> None:
    images = torch.rand(2, 3, 16, 16)
    masks = torch.ones(2, 16, 16, dtype=torch.long)
    out_images, out_masks = BatchAugment(hflip=False, scale_min=0.5, scale_max=0.5)(images, masks)
    assert out_images.shape == images.shape and out_masks.shape == masks.shape
    assert set(out_masks.unique().tolist()) == {1, 255}
    with pytest.raises(ValueError, match="scale_min"):
        BatchAugment(scale_min=2.0, scale_max=1.0)


def test_shapes_module_generates_then_reads_like_voc(tmp_path: Path) -> None:
    from segx.data import ShapesDataModule

    dm = ShapesDataModule(root=str(tmp_path), num_train=6, num_val=3, min_size=40, max_size=48, image_size=32)
    dm.setup("fit")
    assert len(dm.load_split("train")) == 6 and len(dm.load_split("val")) == 3
    write_shapes_dataset(tmp_path, num_train=6, num_val=3, min_size=40, max_size=48)  # idempotent
    assert len(cache_files(tmp_path)) == 2
