"""The embedded shapes dataset: VOC layout, determinism, idempotent atomic generation, learnable looks."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import VOCSegmentation

from segx.data.shapes import (
    MARKER_NAME,
    MIN_IMAGES_FOR_ALL_CLASSES,
    OLD_PREFIX,
    TMP_PREFIX,
    render_sample,
    write_shapes_dataset,
)
from segx.data.voc import IGNORE_INDEX, NUM_CLASSES, VOC_PALETTE

SMALL = {"num_train": 12, "num_val": 4, "seed": 0, "min_size": 48, "max_size": 80}


def all_files(voc_dir: Path) -> dict[str, Path]:
    return {str(p.relative_to(voc_dir)): p for p in sorted(voc_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes-small")
    write_shapes_dataset(root, **SMALL)
    return root


def interiors(mask: np.ndarray) -> np.ndarray:
    """Pixels whose four neighbours carry the same label: away from borders and JPEG edge ringing."""
    inner = np.zeros(mask.shape, dtype=bool)
    core = mask[1:-1, 1:-1]
    inner[1:-1, 1:-1] = (core == mask[:-2, 1:-1]) & (core == mask[2:, 1:-1])
    inner[1:-1, 1:-1] &= (core == mask[1:-1, :-2]) & (core == mask[1:-1, 2:])
    return inner


def test_torchvision_reads_every_split(small_root: Path) -> None:
    expected = {"train": 12, "val": 4, "trainval": 16}
    for split, length in expected.items():
        dataset = VOCSegmentation(str(small_root), year="2012", image_set=split)
        assert len(dataset) == length
        for image, mask in (dataset[0], dataset[length - 1]):
            assert image.mode == "RGB" and mask.mode == "P"
            assert image.size == mask.size
            assert all(48 <= side <= 80 for side in image.size)
            values = np.array(mask)
            assert set(np.unique(values).tolist()) <= {*range(NUM_CLASSES), IGNORE_INDEX}
            assert ((values > 0) & (values < NUM_CLASSES)).any() and (values == IGNORE_INDEX).any()
    train = VOCSegmentation(str(small_root), year="2012", image_set="train").images
    val = VOCSegmentation(str(small_root), year="2012", image_set="val").images
    assert not set(train) & set(val)


def test_every_mask_has_objects_void_borders_and_the_voc_palette(small_root: Path) -> None:
    masks = sorted((small_root / "VOCdevkit" / "VOC2012" / "SegmentationClass").glob("*.png"))
    assert len(masks) == 16
    sizes = set()
    for path in masks:
        with Image.open(path) as mask:
            assert mask.mode == "P"
            assert mask.getpalette() == VOC_PALETTE.flatten().tolist()
            values = np.array(mask)
        sizes.add(values.shape)
        assert ((values > 0) & (values < NUM_CLASSES)).any() and (values == IGNORE_INDEX).any()
        # VOC-style void: two different labels never touch directly, a 255 band always separates them
        for a, b in ((values[:, 1:], values[:, :-1]), (values[1:, :], values[:-1, :])):
            touching = (a != b) & (a != IGNORE_INDEX) & (b != IGNORE_INDEX)
            assert not touching.any(), path.name
    assert len(sizes) > 1  # sizes vary, so resizing and full-resolution scoring both matter


def test_same_arguments_give_identical_bytes(tmp_path: Path) -> None:
    first = write_shapes_dataset(tmp_path / "a", **SMALL)
    second = write_shapes_dataset(tmp_path / "b", **SMALL)
    files_a, files_b = all_files(first), all_files(second)
    assert files_a.keys() == files_b.keys() and len(files_a) == 16 * 2 + 3 + 1
    for name, path in files_a.items():
        assert path.read_bytes() == files_b[name].read_bytes(), name
    other = write_shapes_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    image = "JPEGImages/shapes_train_000000.jpg"
    assert (other / image).read_bytes() != files_a[image].read_bytes()


def test_a_second_call_rewrites_nothing_and_new_parameters_regenerate(tmp_path: Path) -> None:
    voc_dir = write_shapes_dataset(tmp_path, **SMALL)
    mtimes = {name: p.stat().st_mtime_ns for name, p in all_files(voc_dir).items()}
    assert write_shapes_dataset(tmp_path, **SMALL) == voc_dir
    assert {name: p.stat().st_mtime_ns for name, p in all_files(voc_dir).items()} == mtimes

    write_shapes_dataset(tmp_path, **{**SMALL, "num_train": 5})
    assert len(VOCSegmentation(str(tmp_path), year="2012", image_set="train")) == 5
    assert len(list((voc_dir / "JPEGImages").glob("shapes_train_*.jpg"))) == 5  # old tree removed, not merged
    assert json.loads((voc_dir / MARKER_NAME).read_text())["num_train"] == 5
    assert sorted(p.name for p in (tmp_path / "VOCdevkit").iterdir()) == ["VOC2012"]


def test_a_foreign_voc_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    voc_dir = tmp_path / "VOCdevkit" / "VOC2012"
    (voc_dir / "JPEGImages").mkdir(parents=True)
    precious = voc_dir / "JPEGImages" / "2007_000032.jpg"
    precious.write_bytes(b"real data")
    with pytest.raises(FileExistsError, match=r"(?s)VOC2012.*data\.root.*data=shapes"):
        write_shapes_dataset(tmp_path, **SMALL)
    assert precious.read_bytes() == b"real data"
    assert sorted(p.name for p in voc_dir.rglob("*")) == ["2007_000032.jpg", "JPEGImages"]


def test_a_killed_build_does_not_break_the_next(tmp_path: Path) -> None:
    devkit = tmp_path / "VOCdevkit"
    # killed while writing: a half temp tree without marker
    half = devkit / f"{TMP_PREFIX}12345-1"
    (half / "JPEGImages").mkdir(parents=True)
    (half / "JPEGImages" / "shapes_train_000000.jpg").write_bytes(b"trunc")
    # killed while replacing an old tree: the old one moved aside, VOC2012 missing
    (devkit / f"{OLD_PREFIX}12345-1" / "JPEGImages").mkdir(parents=True)
    voc_dir = write_shapes_dataset(tmp_path, **SMALL)
    assert sorted(p.name for p in devkit.iterdir()) == ["VOC2012"]
    assert len(VOCSegmentation(str(tmp_path), year="2012", image_set="trainval")) == 16
    assert len(all_files(voc_dir)) == 16 * 2 + 3 + 1


def test_concurrent_callers_share_one_complete_tree(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[Exception] = []

    def build() -> None:
        try:
            results.append(write_shapes_dataset(tmp_path, **SMALL))
        except Exception as error:  # reported by the assertion below, not lost in the thread
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1 and len(results) == 4
    assert sorted(p.name for p in (tmp_path / "VOCdevkit").iterdir()) == ["VOC2012"]
    assert len(all_files(results[0])) == 16 * 2 + 3 + 1


def test_each_class_has_one_recognisable_colour(tmp_path: Path) -> None:
    voc_dir = write_shapes_dataset(tmp_path, num_train=60, num_val=1, seed=3, min_size=48, max_size=80)
    samples: dict[int, list[np.ndarray]] = {}
    for image_path in sorted((voc_dir / "JPEGImages").glob("*.jpg")):
        image = np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float64)
        mask = np.array(Image.open(voc_dir / "SegmentationClass" / f"{image_path.stem}.png"))
        inner = interiors(mask)
        for cls in np.unique(mask[inner]):
            if 0 < cls < NUM_CLASSES:
                samples.setdefault(int(cls), []).append(image[inner & (mask == cls)].mean(axis=0))
    assert len(samples) >= 15  # most classes appear, so the comparison below means something
    centroids = {cls: np.mean(means, axis=0) for cls, means in samples.items()}
    for cls, means in samples.items():
        spread = max(np.linalg.norm(m - centroids[cls]) for m in means)
        assert spread < 25, (cls, spread)
    classes = sorted(centroids)
    gaps = [np.linalg.norm(centroids[a] - centroids[b]) for a in classes for b in classes if a < b]
    assert min(gaps) > 40, min(gaps)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_train": 0}, "num_train"),
        ({"num_val": 0}, "num_val"),
        ({"min_size": 8}, "min_size"),
        ({"min_size": 100, "max_size": 60}, "min_size"),
        ({"seed": -1}, "seed"),
        ({"num_train": 2.5}, "num_train"),
    ],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        write_shapes_dataset(tmp_path, **{**SMALL, **kwargs})
    assert not (tmp_path / "VOCdevkit").exists()


def classes_in_masks(masks: list[np.ndarray]) -> set[int]:
    return {int(v) for mask in masks for v in np.unique(mask)} - {0, IGNORE_INDEX}


def test_every_class_occurs_in_every_split_of_the_default_size() -> None:
    """`make demo`'s tree (200 train, 50 val, seed 0, 96-160 px): no class scores as absent in val."""
    for split, count in (("train", 200), ("val", 50)):
        masks = [np.array(render_sample(0, split, i, 96, 160)[1]) for i in range(count)]
        assert classes_in_masks(masks) == set(range(1, NUM_CLASSES)), split


def test_every_class_occurs_in_the_test_suites_val_split(shapes_root: Path) -> None:
    """The 16-image val split the suite trains on (conftest's TINY_SHAPES), read back from its PNGs."""
    masks_dir = shapes_root / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    masks = [np.array(Image.open(p)) for p in sorted(masks_dir.glob("shapes_val_*.png"))]
    assert len(masks) == 16
    assert classes_in_masks(masks) == set(range(1, NUM_CLASSES))


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_ten_images_are_enough_for_every_class(seed: int) -> None:
    assert MIN_IMAGES_FOR_ALL_CLASSES == 10
    for split in ("train", "val"):
        for first in (0, 10, 20):  # images 0-9, 10-19, ...: a split of 10 or more holds every class
            masks = [np.array(render_sample(seed, split, i, 48, 80)[1]) for i in range(first, first + 10)]
            assert classes_in_masks(masks) == set(range(1, NUM_CLASSES)), (seed, split, first)
