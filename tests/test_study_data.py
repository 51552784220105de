"""The study's data handling (protocol=study) against the study's own code, run on the same files with cv2.

The reference lines are `caching_and_preprocessing.convert_VOC` and `image_segmentation_generator` /
`weights_segmentation_generator` of ../shared/seed/study-code/, translated here line for line (that code is not
importable: it is a Colab export that mounts a drive)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from segx.core.errors import ConfigError
from segx.data.normalize import Normalize
from segx.data.shapes_datamodule import ShapesDataModule
from segx.training.losses import class_weights
from tests.conftest import ROOT

cv2 = pytest.importorskip("cv2", reason="opencv-python-headless is in the dev extra (the study's image reader)")

SIZE = 64  # the shapes images are 48-80 px: both up- and down-scaling
SHAPES = {"num_train": 96, "num_val": 16, "min_size": 48, "max_size": 80}

# convert_VOC's colour table in its own order: (B, G, R) as cv2.imread gives them, and the class it becomes.
STUDY_BGR = [(0, 0, 0), (0, 0, 128), (0, 128, 0), (0, 128, 128), (128, 0, 0), (128, 0, 128), (128, 128, 0),
             (128, 128, 128), (0, 0, 64), (0, 0, 192), (0, 128, 64), (0, 128, 192), (128, 0, 64), (128, 0, 192),
             (128, 128, 64), (128, 128, 192), (0, 64, 0), (0, 64, 128), (0, 192, 0), (0, 192, 128), (128, 64, 0)]


def study_convert_voc(img: np.ndarray) -> np.ndarray:
    """`convert_VOC`: each class colour becomes its index in every channel, in place, then "Edge as Background"."""
    for index, (b, g, r) in enumerate(STUDY_BGR):
        img[(img[:, :, 0] == b) * (img[:, :, 1] == g) * (img[:, :, 2] == r)] = index
    img[img[:, :, 0] > 20] = 0
    return img


def study_batch(pairs: list[tuple[Path, Path]], converted: Path) -> tuple[np.ndarray, np.ndarray]:
    """`make_dataset_VOC` (convert and write the masks) then one batch of `image_segmentation_generator`, with the
    one-hot labels as class indices (argmax of a one-hot row; a row of zeros would show as -1)."""
    converted.mkdir()
    images, labels = [], []
    for image_file, mask_file in pairs:
        seg_file = converted / mask_file.name
        cv2.imwrite(str(seg_file), study_convert_voc(cv2.imread(str(mask_file), 1)))
        img = cv2.resize(cv2.imread(str(image_file), 1), (SIZE, SIZE)).astype(np.float32)
        img /= 255.0
        images.append(img)
        seg = cv2.resize(cv2.imread(str(seg_file), 1), (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)[:, :, 0]
        seg_labels = np.zeros((SIZE, SIZE, 21))
        for c in range(21):
            seg_labels[:, :, c] = (seg == c).astype(int)
        labels.append(np.where(seg_labels.any(-1), seg_labels.argmax(-1), -1))
    return np.array(images), np.array(labels)


def study_data_module(shapes_root: Path, *overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["protocol=study", "data=shapes", f"data.root={shapes_root}",
                                          f"data.image_size={SIZE}", *[f"data.{k}={v}" for k, v in SHAPES.items()],
                                          *overrides])
    return instantiate(cfg.data)


def split_pairs(shapes_root: Path, split: str) -> list[tuple[Path, Path]]:
    voc = shapes_root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
    return [(voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png") for i in ids]


def test_a_study_mode_batch_is_the_study_generators_output(shapes_root: Path, tmp_path: Path) -> None:
    datamodule = study_data_module(shapes_root, f"data.cache_dir={tmp_path / 'cache'}")
    cached = datamodule.load_split("val")
    images, masks = datamodule.prepare_batch((cached.images, cached.masks), training=True)  # the training path
    expected_images, expected_labels = study_batch(split_pairs(shapes_root, "val"), tmp_path / "converted")

    # Images: BGR, x / 255 and nothing else, cv2's bilinear resize (no antialiasing) to within one grey level.
    ours = images.permute(0, 2, 3, 1).numpy()
    assert ours.shape == expected_images.shape
    assert np.abs(ours - expected_images).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - expected_images).mean() < 0.3 / 255  # measured: 0.2 / 255 (rounding of the interpolation)
    # Masks: void borders counted as background (the study's one-hot rows are never empty), cv2's INTER_NEAREST.
    assert any((np.array(Image.open(mask)) == 255).any() for _, mask in split_pairs(shapes_root, "val")), \
        "the shapes masks have void borders to convert"
    assert (expected_labels >= 0).all() and not (masks == 255).any()
    agreement = (masks.numpy() == expected_labels).mean()
    assert agreement >= 0.9995, agreement
    # Nothing is flipped in training: two draws of the same batch are identical.
    again, _ = datamodule.prepare_batch((cached.images, cached.masks), training=True)
    assert torch.equal(images, again)


def test_the_class_weights_are_the_studys(shapes_root: Path, tmp_path: Path) -> None:
    """`weights_segmentation_generator` + `-np.log(weights / sum(weights))` on the converted, resized train masks."""
    datamodule = study_data_module(shapes_root, f"data.cache_dir={tmp_path / 'cache'}")
    counts = np.zeros(21, dtype=int)
    for _, mask_file in split_pairs(shapes_root, "train"):
        seg = study_convert_voc(cv2.imread(str(mask_file), 1))
        seg = cv2.resize(seg, (SIZE, SIZE), interpolation=cv2.INTER_NEAREST)[:, :, 0]
        counts += np.array([(seg == c).sum() for c in range(21)])
    present = counts > 0
    study = -np.log(counts[present] / counts.sum())
    ours = class_weights(datamodule.class_frequencies(), "neg_log").numpy()
    assert np.allclose(ours[present], study, rtol=2e-3, atol=2e-3)
    assert (ours[~present] == 0).all()  # the study's -log(0) = inf never reached its loss: those classes are absent


def test_segx_protocol_keeps_segx_data_handling(shapes_root: Path, tmp_path: Path) -> None:
    segx = study_data_module(shapes_root, "protocol=segx", f"data.cache_dir={tmp_path / 'cache'}")
    assert segx.normalizer.channel_order == "rgb" and segx.interpolation == "antialias"
    assert (segx.load_split("val").masks == 255).any()  # void stays unscored
    study = study_data_module(shapes_root, f"data.cache_dir={tmp_path / 'cache'}")
    caches = sorted(p.name for p in (tmp_path / "cache").glob("val-*.pt"))
    study.load_split("val")
    assert len(sorted(p.name for p in (tmp_path / "cache").glob("val-*.pt"))) == len(caches) + 1  # its own cache


def test_bad_channel_order_and_interpolation_are_named(shapes_root: Path) -> None:
    with pytest.raises(ConfigError, match="data.channel_order='grb' is not a choice"):
        Normalize([0, 0, 0], [1, 1, 1], "grb")
    with pytest.raises(ConfigError, match="data.interpolation='bicubic' is not a choice"):
        ShapesDataModule(root=str(shapes_root), image_size=SIZE, interpolation="bicubic", **SHAPES)
