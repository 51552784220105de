"""The cached data module and its sources: VOC reading, the tensor store, batching, augmentation, option checks."""

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

from segx.core.errors import ConfigError, SegxError
from segx.data import CachedSegmentationDataModule, SegmentationSource, ShapesDataModule, SplitFiles, VOCDataModule
from segx.data.augment import BatchAugment
from segx.data.cache import CACHE_FORMAT
from segx.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from segx.data.shapes import write_shapes_dataset
from segx.data.voc import voc_split_files


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
from segx.data.voc import voc_split_files

root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
files = voc_split_files(root, "train")
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
cached = load_or_build(root / "segx-cache", "train", files, 32, num_classes=21)
print("BUILT" if built else "LOADED", int(cached.images.sum()), int(cached.masks.sum()))
"""


@pytest.mark.slow
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
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(x * std + mean, images.float() / 255, atol=1e-6)  # standardised with data.mean/std


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
    dm = ShapesDataModule(root=str(tmp_path), num_train=6, num_val=3, min_size=40, max_size=48, image_size=32)
    dm.setup("fit")
    assert len(dm.load_split("train")) == 6 and len(dm.load_split("val")) == 3
    write_shapes_dataset(tmp_path, num_train=6, num_val=3, min_size=40, max_size=48)  # idempotent
    assert len(cache_files(tmp_path)) == 2


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"image_size": 8}, r"data\.image_size=8 is too small"),
        ({"image_size": "big"}, r"data\.image_size='big' must be a whole number"),
        ({"batch_size": 0}, r"data\.batch_size=0 must be at least 1"),
        ({"val_batch_size": -2}, r"data\.val_batch_size=-2 must be at least 1"),
        ({"num_workers": -1}, r"data\.num_workers=-1"),
        ({"on_device": "gpu"}, r"data\.on_device='gpu' is not a choice"),
        ({"on_device_memory_fraction": 1.5}, r"data\.on_device_memory_fraction=1\.5 must be in \(0, 1\]"),
        ({"num_classes": 3}, r"data\.class_names has 21 names but data\.num_classes=3"),
        ({"augment": {"vflip": True}}, r"data\.augment has no option vflip; its options are hflip, scale_min"),
        ({"augment": {"hflip": "yes"}}, r"data\.augment\.hflip='yes' must be true or false"),
        ({"augment": {"scale_min": 2.0, "scale_max": 1.0}}, r"0 < scale_min <= scale_max"),
        ({"mean": [0.5, 0.5]}, r"data\.mean=\[0\.5, 0\.5\] must be 3 numbers"),
        ({"std": [0.2, 0.0, 0.2]}, r"data\.std=.* must be 3 positive numbers"),
        ({"train_split": "test"}, r"data\.train_split='test' is not a split of this dataset; choose one of train"),
    ],
)
def test_a_bad_data_option_is_a_config_error_before_anything_is_read(
    tmp_path: Path, options: dict, match: str,
) -> None:
    """Every bad value of a data option is a ConfigError naming it (it was a plain SegxError for some, a
    TypeError for an unknown augment key), raised by the constructor: nothing is generated or read."""
    with pytest.raises(ConfigError, match=match) as error:
        ShapesDataModule(root=str(tmp_path / "shapes"), **options)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "shapes").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [({"num_train": 0}, r"data\.num_train must be at least 1"),
     ({"shapes_seed": -1}, r"data\.shapes_seed must be at least 0"),
     ({"min_size": 90, "max_size": 60}, r"data\.min_size \(90\) is larger than data\.max_size \(60\)")],
)
def test_a_bad_shapes_option_names_its_data_key(tmp_path: Path, options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ShapesDataModule(root=str(tmp_path / "shapes"), **options)
    assert not (tmp_path / "shapes").exists()


def test_a_missing_or_bad_data_root_is_a_data_error_not_a_config_error(voc_copy: Path) -> None:
    with pytest.raises(SegxError) as missing:
        VOCDataModule(root=str(voc_copy / "nowhere")).load_split("train")
    (voc_copy / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").write_text("")
    with pytest.raises(SegxError, match=r"The VOC val split under data\.root=.* is empty") as empty:
        VOCDataModule(root=str(voc_copy)).load_split("val")
    for error in (missing, empty):
        assert not isinstance(error.value, ConfigError), error.value


class PlainFolder(SegmentationSource):
    """A source that is not VOC: <root>/<split>/<id>.png images beside <id>_mask.png masks, 3 classes, void 9."""

    classes = ("sky", "sea", "boat")
    palette = np.zeros((256, 3), dtype=np.uint8)
    ignore_index = 9

    def __init__(self, root: Path) -> None:
        self.root = root

    def split_files(self, split: str) -> SplitFiles:
        images = sorted(p for p in (self.root / split).glob("*.png") if not p.stem.endswith("_mask"))
        return SplitFiles([p.stem for p in images], [str(p) for p in images],
                          [str(p.with_name(f"{p.stem}_mask.png")) for p in images])

    def bad_files_fix(self, split: str) -> str:
        return f"Fix them in {self.root / split}."


def write_plain_folder(root: Path, values: list[int]) -> None:
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for i, value in enumerate(values):
            Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(root / split / f"{i}.png")
            labels = np.zeros((20, 24), dtype=np.uint8)
            labels[:, 12:] = value
            Image.fromarray(labels, mode="L").save(root / split / f"{i}_mask.png")


def test_the_cached_module_serves_any_source_with_its_classes_and_ignore_index(tmp_path: Path) -> None:
    """The seam a new dataset plugs into: the cache, the file checks, class weights and augmentation take the
    source's classes, ignore index and words, and nothing about VOC."""
    write_plain_folder(tmp_path / "good", [1, 2, 9])
    dm = CachedSegmentationDataModule(PlainFolder(tmp_path / "good"), image_size=16, batch_size=3,
                                      augment={"hflip": False, "scale_min": 0.5, "scale_max": 0.5})
    assert dm.class_names == ["sky", "sea", "boat"] and dm.num_classes == 3 and dm.ignore_index == 9
    assert len(dm.load_split("train")) == 3 and dm.cache_dir == tmp_path / "good" / "segx-cache"
    freq = dm.class_frequencies()  # 3 images, half of each is class 0; the other halves are 1, 2 and void (9)
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64))
    dm.setup("fit")
    _, masks = dm.prepare_batch(next(iter(dm.train_dataloader())), training=True)
    assert set(masks.unique().tolist()) <= {0, 1, 2, 9} and (masks == 9).any()  # a downscale pads with void

    write_plain_folder(tmp_path / "bad", [1, 5, 2])
    with pytest.raises(SegxError) as error:
        CachedSegmentationDataModule(PlainFolder(tmp_path / "bad"), image_size=16).load_split("val")
    message = str(error.value)
    assert ("The val split has 1 bad file(s), so no cache was written: 1 mask(s) with values outside the classes "
            f"(0..2 and 9 are allowed) in {tmp_path / 'bad' / 'val'}: 1_mask.png (values 5). Fix them in "
            f"{tmp_path / 'bad' / 'val'}.") == message
    assert "VOC" not in message
    (tmp_path / "bad" / "train" / "0.png").write_bytes(b"not a png")
    with pytest.raises(SegxError, match=r"1 image\(s\) that cannot be decoded \(truncated or corrupt PNG\)"):
        CachedSegmentationDataModule(PlainFolder(tmp_path / "bad"), image_size=16).load_split("train")
