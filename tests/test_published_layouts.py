"""Datasets read as they are published: SegNet's CamVid layout (per-split folders, lists of image and mask paths
written on another machine, void as class 11), and the keys a user sets for it on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from segx.core.errors import ConfigError, DatasetUnavailableError
from segx.data.folder import FolderDataModule, FolderSource
from tests.conftest import QUIET, ROOT, read_json, run_in_process
from tests.folder_data import RGB_COLOURS, draw_sample, write_folder_dataset

CAMVID_CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign", "fence", "car", "pedestrian",
                  "bicyclist"]  # SegNet's 11; its masks hold 11 for void
FOREIGN = "/SegNet/CamVid"  # where SegNet's lists say the files are: the authors' machine


def write_segnet_camvid(root: Path, counts: dict[str, int] | None = None) -> Path:
    """<root>/{train,val,test}/*.png, <root>/{split}annot/*.png (values 0..10, and 11 for void) and <root>/<split>.txt
    whose lines are `/SegNet/CamVid/<split>/<name> /SegNet/CamVid/<split>annot/<name>`, as SegNet ships CamVid."""
    rng = np.random.default_rng(0)
    for split, count in (counts or {"train": 8, "val": 4, "test": 2}).items():
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        lines = []
        for index in range(count):
            image, mask = draw_sample(rng, 36, 48, len(CAMVID_CLASSES))
            mask[:3] = 11  # a band of void in every mask
            name = f"0001TP_{index:06d}.png"
            Image.fromarray(image).save(root / split / name)
            Image.fromarray(mask, mode="L").save(root / f"{split}annot" / name)
            lines.append(f"{FOREIGN}/{split}/{name} {FOREIGN}/{split}annot/{name}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def camvid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_segnet_camvid(tmp_path_factory.mktemp("CamVid"))


def source(root: Path, **keys: object) -> FolderSource:
    options = {"img_suffix": ".png", "class_names": CAMVID_CLASSES, "ignore_index": 11, **keys}
    return FolderSource(root, **options)


def test_per_split_folders_are_templates_of_the_split(camvid: Path) -> None:
    files = source(camvid, img_dir="{split}", ann_dir="{split}annot").split_files("val")
    assert len(files.ids) == 4 and files.ids[0] == "0001TP_000000"
    assert files.images[0] == str(camvid / "val" / "0001TP_000000.png")
    assert files.masks[0] == str(camvid / "valannot" / "0001TP_000000.png")
    with pytest.raises(DatasetUnavailableError, match=r"No train images: .*/trainimages does not exist"):
        source(camvid, img_dir="{split}images", ann_dir="{split}annot").split_files("train")


def test_lists_of_pairs_written_elsewhere_resolve_under_the_root(camvid: Path) -> None:
    files = source(camvid, split_lists={"train": "train.txt"}).split_files("train")
    assert len(files.ids) == 8 and files.ids[0] == "train/0001TP_000000"
    assert files.images[3] == str(camvid / "train" / "0001TP_000003.png")
    assert files.masks[3] == str(camvid / "trainannot" / "0001TP_000003.png")
    # Paths that exist as written, or relative to the root, are taken as they are.
    (camvid / "mixed.txt").write_text(f"{camvid}/val/0001TP_000000.png valannot/0001TP_000000.png\n")
    files = source(camvid, split_lists={"val": "mixed.txt"}).split_files("val")
    assert files.masks == [str(camvid / "valannot" / "0001TP_000000.png")]


def test_a_list_that_resolves_nowhere_names_its_first_line_and_the_rule(camvid: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "train.txt").write_text((camvid / "train.txt").read_text())
    with pytest.raises(DatasetUnavailableError) as error:
        source(elsewhere, split_lists={"train": "train.txt"}).split_files("train")
    message = str(error.value)
    assert "8 of the 8 lines of the train list" in message and "first on line 1" in message
    assert f"{FOREIGN}/train/0001TP_000000.png" in message and "trailing components under data.root" in message
    assert str(elsewhere / "train" / "0001TP_000000.png") in message  # where it looked
    (elsewhere / "odd.txt").write_text("a b\nc d e\n")
    with pytest.raises(DatasetUnavailableError, match="Line 2 of the train list .* holds 3 entries"):
        source(elsewhere, split_lists={"train": "odd.txt"}).split_files("train")


def test_ignore_index_right_after_the_classes_is_accepted(camvid: Path) -> None:
    assert source(camvid).ignore_index == 11  # 11 classes: indices 0..10 lie below 11
    with pytest.raises(ConfigError, match=r"12 classes take the indices 0..11, which include data.ignore_index=11; "
                                          r"set data.ignore_index to 12 or more"):
        source(camvid, class_names=[*CAMVID_CLASSES, "void"])


@pytest.mark.parametrize("override, key, value", [
    ("data.split_lists={train: train.txt, val: val.txt}", "split_lists", {"train": "train.txt", "val": "val.txt"}),
    ("data.label_map={11: 255}", "label_map", {11: 255}),
])
def test_the_folder_keys_are_set_without_a_plus(override: str, key: str, value: object) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=folder", override])
    assert cfg.data[key] == value


@pytest.mark.slow
def test_camvid_as_segnet_ships_it_trains_with_keys_only(camvid: Path, tmp_path: Path) -> None:
    """The README's CamVid command line on the generated tree (no file moved, no symlink; void 11 as the ignore
    index), trained with a relative data.root and evaluated on its test split from another folder."""
    run_dir = tmp_path / "run"
    run_in_process(
        "train.py", "data=folder", f"data.root={os.path.relpath(camvid, ROOT)}", "data.img_dir='{split}'",
        "data.ann_dir='{split}annot'", "data.img_suffix=.png", f"data.class_names=[{','.join(CAMVID_CLASSES)}]",
        "data.ignore_index=11", "data.image_size=32", "data.batch_size=4", "model=unet_small",
        "model.encoder_widths=[8,16]", "model.bottleneck_width=16", "trainer.max_epochs=1", "logger=none",
        "callbacks.prediction_grid=null", *QUIET, f"hydra.run.dir={run_dir}",
    )
    record = read_json(run_dir / "metrics.json")
    assert record["status"] == "completed" and "val/miou" in record["final"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}",
                             "split=test", "hydra.run.dir=eval"], cwd=elsewhere, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(elsewhere / "eval" / "metrics.json")["n_images"] == 2


def test_a_missing_root_says_so_and_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailableError, match=f"data.root={tmp_path / 'nowhere'} does not exist.*point "
                                                      "data.root= at the dataset's folder"):
        FolderSource(tmp_path / "nowhere")


def test_a_value_in_every_mask_is_named_with_the_keys_that_map_it(camvid: Path, tmp_path: Path) -> None:
    module = FolderDataModule(str(camvid), img_dir="{split}", ann_dir="{split}annot", img_suffix=".png",
                              class_names=CAMVID_CLASSES, image_size=32, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DatasetUnavailableError) as error:
        module.load_split("train")
    message = str(error.value)
    assert "8 mask(s) with values outside the classes" in message and "(values 11)" in message
    assert "The values 11 in 8 of 8 masks look like a label convention" in message
    assert "data.label_map={11: 255}" in message and "data.ignore_index=11" in message
    assert not list((tmp_path / "cache").glob("*.pt"))  # nothing cached


def test_colour_masks_are_read_through_the_palette_by_default(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", rgb_masks=True, counts={"train": 3})
    classes = ["background", "square", "disc"]
    auto = FolderDataModule(str(root), class_names=classes, palette=RGB_COLOURS, image_size=32,
                            cache_dir=str(tmp_path / "cache"))
    rgb = FolderDataModule(str(root), class_names=classes, palette=RGB_COLOURS, mask_format="rgb", image_size=32,
                           cache_dir=str(tmp_path / "cache-rgb"))
    assert torch.equal(auto.load_split("train").masks, rgb.load_split("train").masks)  # data.mask_format=auto
    index = FolderDataModule(str(root), class_names=classes, palette=RGB_COLOURS, mask_format="index",
                             image_size=32, cache_dir=str(tmp_path / "cache-index"))
    with pytest.raises(DatasetUnavailableError, match="3 mask\\(s\\) that are not index images.*read through "
                                                      "data.palette.*or set data.mask_format=rgb"):
        index.load_split("train")
    unpainted = FolderDataModule(str(root), class_names=classes, image_size=32, cache_dir=str(tmp_path / "c2"))
    with pytest.raises(DatasetUnavailableError, match="give it \\(data.mask_format=auto, the default"):
        unpainted.load_split("train")  # no palette to read colours through
