"""Labels read as their users meant them: the label census, refusals of what cannot be meant (a class never labelled,
a split mostly ignored, 0/255 binary masks, a zero loss), and the conventions of real exports (palette PNGs in their
own order, Supervisely's class file, colours that are no class, paths with spaces, no val split)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segx.core.errors import ConfigError, SegxError
from segx.data.cache import load_or_build
from segx.data.folder import FolderDataModule, FolderSource, background_of
from segx.inference.evaluate import prediction_path
from segx.runs.record import read_record
from tests.conftest import run_in_process
from tests.folder_data import RGB_COLOURS, draw_sample, save_palette_mask, write_binary_dataset, write_folder_dataset

# The shipped defaults (progress bar and callbacks on), on a narrow network and small images.
SMALL = ["model=unet_small", "model.encoder_widths=[8,16]", "model.bottleneck_width=32", "logger=none",
         "trainer.max_epochs=2", "data.image_size=32", "data.batch_size=4"]
BINARY = ["data=folder", "data.img_suffix=.png", "data.val_fraction=0.25"]


def _decoded_counts(paths: list[Path], mapping: dict[int, str]) -> dict[str, int]:
    """Pixels per class name, decoded here from the files with PIL alone (the census's independent check)."""
    counts = dict.fromkeys(mapping.values(), 0)
    for path in paths:
        values, pixels = np.unique(np.array(Image.open(path)), return_counts=True)
        for value, n in zip(values.tolist(), pixels.tolist(), strict=True):
            counts[mapping[value]] += n
    return counts


def test_binary_0_255_masks_are_refused_then_trained_as_meant_with_their_census_and_a_held_out_val(
        tmp_path: Path) -> None:
    """A membrane set as its authors ship it: 0/255 masks, no val split, ids in sub-folders. Read as it is, 255 is
    the ignore value and 'cell' never labelled: refused before training (exit 2). Accepted knowingly with a
    class-weighted loss, its loss is exactly 0 and the run stops. With data.label_map={255: 1} it trains, prints and
    records its census (checked against PIL's own decode), holds out a seeded val split and records its ids, and
    evaluates with its predictions saved under the ids' sub-folders."""
    root = write_binary_dataset(tmp_path / "membranes")
    refused = run_in_process("train.py", *BINARY, f"data.root={root}", *SMALL, f"hydra.run.dir={tmp_path / 'a'}",
                             check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 2, output[-3000:]
    assert "only 0 and 255" in output and "data.label_map={255: 1}" in output and "Traceback" not in output
    assert "data.absent_classes=[cell]" in output and read_record(tmp_path / "a").get("history") is None
    assert output.index("Label census") < output.index("only 0 and 255")  # the table stands above the refusal
    assert read_record(tmp_path / "a")["label_census"]["train"]["cell"] == 0

    zero = run_in_process("train.py", *BINARY, f"data.root={root}", *SMALL, "loss=weighted_ce",
                          "data.absent_classes=[cell]", "data.max_ignored_fraction=1",
                          f"hydra.run.dir={tmp_path / 'b'}", check=False)
    output = zero.stdout + zero.stderr
    assert zero.returncode == 2, output[-3000:]
    assert "The training loss was exactly 0" in output and "data.label_map={255: 1}" in output
    assert read_record(tmp_path / "b")["status"] == "failed"

    run = tmp_path / "run"
    result = run_in_process("train.py", *BINARY, f"data.root={root}", *SMALL, "data.label_map={255: 1}",
                            f"hydra.run.dir={run}")
    output = result.stdout + result.stderr
    assert "Label census" in output and "train masks: raw values 255" in output
    assert "smaller than the logging interval" not in output  # log_every_n_steps fitted to the 3-batch epoch
    record = read_record(run)
    held = record["val_held_out"]
    assert held["fraction"] == 0.25 and held["seed"] == 0 and len(held["ids"]) == 4
    masks = sorted((root / "annotations" / "train").rglob("*.png"))
    val = [p for p in masks if str(p.relative_to(root / "annotations" / "train"))[:-4] in held["ids"]]
    train = [p for p in masks if p not in val]
    assert len(train) == 12 and all("/" in i for i in held["ids"])
    expected = {"train": _decoded_counts(train, {0: "membrane", 255: "cell"}),
                "val": _decoded_counts(val, {0: "membrane", 255: "cell"})}
    assert record["label_census"] == {split: {**counts, "ignored": 0} for split, counts in expected.items()}
    assert record["mask_readings"] == {"train": {"L by value": 12}, "val": {"L by value": 4}}
    assert "val/miou_no_bg" not in record["best"]  # no class is named background: none is dropped from a score

    run_in_process("evaluate.py", f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "save_predictions=true",
                   f"hydra.run.dir={tmp_path / 'eval'}")
    assert all((tmp_path / "eval" / "predictions" / f"{i}.png").is_file() for i in held["ids"])

    from segx.report import collect_runs, write_report

    write_report(collect_runs(run), tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Label census" in report and f"| cell | {expected['train']['cell']:,} |" in report


def _folder(root: Path, **options: object) -> FolderDataModule:
    return FolderDataModule(root=str(root), image_size=32, batch_size=4, cache_dir=str(root / "cache"), **options)


def test_palette_pngs_are_read_by_their_colours_when_a_palette_is_given(tmp_path: Path) -> None:
    """Each mask a palette PNG whose indices follow its own order of colours (as Supervisely saves them): with
    data.palette given the colours decide, so every cached label is the class drawn; without it, the indices."""
    rng = np.random.default_rng(3)
    root = tmp_path / "tiles"
    truth = {}
    for split, count in (("train", 6), ("val", 2)):
        for folder in ("images", "annotations"):
            (root / folder / split).mkdir(parents=True)
        for index in range(count):
            image, labels = draw_sample(rng, 32, 32, 3)
            Image.fromarray(image).save(root / "images" / split / f"{index}.jpg")
            order = [[2, 0, 1], [1, 2, 0], [0, 1, 2]][index % 3]
            save_palette_mask(root / "annotations" / split / f"{index}.png", labels, RGB_COLOURS, order)
            truth[(split, index)] = labels
    datamodule = _folder(root, class_names=["background", "square", "disc"], palette=RGB_COLOURS)
    cached = datamodule.load_split("train")
    for index in range(6):
        assert (cached.masks[index].numpy() == truth[("train", index)]).all()  # same size: nearest keeps every pixel
    census = datamodule.check_labels()
    assert census[0].readings == {"P by colour": 6}
    counts = {name: sum(int((truth[("train", i)] == c).sum()) for i in range(6))
              for c, name in enumerate(["background", "square", "disc"])}
    assert census[0].pixels == {**counts, "ignored": 0}
    by_index = _folder(root, class_names=["background", "square", "disc"])
    assert by_index.label_census("train").readings == {"P by palette index": 6}
    assert not (by_index.load_split("train").masks[0].numpy() == truth[("train", 0)]).all()


def test_class_files_as_annotation_tools_write_them_and_no_dict_becomes_a_class_name(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", rgb_masks=True)
    supervisely = {"classes": [{"title": "Water", "shape": "polygon", "color": "#50E3C2", "geometry_config": {}},
                               {"title": "Land", "shape": "bitmap", "color": "#8B572A"},
                               {"title": "Road", "shape": "polygon", "color": [155, 155, 155]}], "tags": []}
    (root / "classes.json").write_text(json.dumps(supervisely))
    source = FolderSource(root)
    assert source.classes == ("Water", "Land", "Road")
    assert source.palette[:3].tolist() == [[80, 227, 194], [139, 87, 42], [155, 155, 155]]
    assert source.background_index is None  # no class named background
    (root / "classes.json").write_text(json.dumps({"background": "#000000", "square": [200, 30, 30]}))
    source = FolderSource(root)
    assert source.classes == ("background", "square") and source.background_index == 0
    assert source.palette[1].tolist() == [200, 30, 30]
    for payload in ({"classes": [{"shape": "polygon", "color": "#50E3C2"}]}, {"water": 1, "land": 2},
                    [{"title": "Water"}], {"classes": ["a", "b"], "palette": ["red", "#000000"]}):
        (root / "classes.json").write_text(json.dumps(payload))
        with pytest.raises(ConfigError, match="Supervisely's") as error:
            FolderSource(root)
        assert "{'" not in str(error.value)


def test_colours_that_are_no_class_are_refused_as_a_convention_then_ignored_when_named(tmp_path: Path) -> None:
    """RGB masks with an "unlabelled" grey in every file: one paragraph calls it a convention and names
    data.ignore_colours; named there, those pixels are the ignore index and the census counts them as ignored."""
    root = write_folder_dataset(tmp_path / "data", rgb_masks=True, counts={"train": 4, "val": 2})
    grey = 0
    for path in sorted((root / "annotations").rglob("*.png")):
        pixels = np.array(Image.open(path))
        pixels[:3] = [155, 155, 155]  # a band of "unlabelled" at the top
        grey += pixels.shape[1] * 3
        Image.fromarray(pixels).save(path)
    options = {"class_names": ["background", "square", "disc"], "palette": RGB_COLOURS}
    with pytest.raises(SegxError) as error:
        _folder(root, **options).load_split("train")
    message = str(error.value)
    assert "#9B9B9B in 4 of 4 masks" in message and "data.ignore_colours=['#9B9B9B']" in message
    assert "Replace these files" in message.split("Otherwise:")[1]  # the damage advice only comes second
    datamodule = _folder(root, ignore_colours=["#9B9B9B"], **options)
    censuses = datamodule.check_labels()
    assert sum(c.pixels["ignored"] for c in censuses) == grey
    assert int((datamodule.load_split("val").masks == 255).sum()) > 0


def test_the_census_refuses_a_class_never_labelled_and_a_mostly_ignored_split_unless_accepted(tmp_path: Path) -> None:
    root = write_folder_dataset(tmp_path / "data", num_classes=3, counts={"train": 4, "val": 2})
    four = ["background", "square", "disc", "star"]  # star is never drawn
    with pytest.raises(ConfigError, match=r"class\(es\) 'star' .* data.absent_classes=\[star\]"):
        _folder(root, class_names=four).check_labels()
    assert _folder(root, class_names=four, absent_classes=["star"]).check_labels()[0].pixels["star"] == 0
    assert _folder(root, class_names=four, absent_classes="any").check_labels()[0].pixels["star"] == 0
    with pytest.raises(ConfigError, match="data.absent_classes names 'moon'"):
        _folder(root, class_names=four, absent_classes=["moon"])
    mostly = {0: 255}  # background ignored: most of each mask
    with pytest.raises(ConfigError, match=r"% of their pixels are ignored .* data.max_ignored_fraction=0.5"):
        _folder(root, class_names=four[:3], label_map=mostly, absent_classes=["background"]).check_labels()
    _folder(root, class_names=four[:3], label_map=mostly, absent_classes=["background"],
            max_ignored_fraction=0.95).check_labels()


def test_split_lists_take_tab_separated_paths_with_spaces_and_a_missing_val_split_names_its_keys(
        tmp_path: Path) -> None:
    root = tmp_path / "aerial"
    rng = np.random.default_rng(0)
    lines = []
    for tile in (1, 2):
        for folder in ("images", "masks"):
            (root / f"Tile {tile}" / folder).mkdir(parents=True)
        image, labels = draw_sample(rng, 24, 24, 3)
        Image.fromarray(image).save(root / f"Tile {tile}" / "images" / "x.jpg")
        Image.fromarray(labels, mode="L").save(root / f"Tile {tile}" / "masks" / "x.png")
        lines.append(f"Tile {tile}/images/x.jpg\tTile {tile}/masks/x.png")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    source = FolderSource(root, class_names=["background", "a", "b"], split_lists={"train": "train.txt"})
    files = source.split_files("train")
    assert files.ids == ["Tile 1/images/x", "Tile 2/images/x"] and Path(files.masks[1]).is_file()
    (root / "bad.txt").write_text("Tile 1/images/x.jpg Tile 1/masks/x.png\n")
    with pytest.raises(SegxError, match="a tab separates the two paths"):
        FolderSource(root, class_names=["a", "b"], split_lists={"train": "bad.txt"}).split_files("train")
    with pytest.raises(SegxError, match=r"data.val_fraction=0.1 .* data.split_lists="):
        source.split_files("val")
    assert prediction_path(tmp_path / "p", "Tile 1/images/x") == tmp_path / "p" / "Tile 1" / "images" / "x.png"
    assert prediction_path(tmp_path / "p", "/abs/../y") == tmp_path / "p" / "abs" / "y.png"


def test_the_background_class_is_the_one_so_named_unless_the_user_says_otherwise() -> None:
    assert background_of(["membrane", "cell"], "auto") is None
    assert background_of(["road", "Background"], "auto") == 1
    assert background_of(["membrane", "cell"], 1) == 1 and background_of(["a"], None) is None
    with pytest.raises(ConfigError, match="data.background_index=5"):
        background_of(["a", "b"], 5)


def test_a_cache_keeps_its_census_and_an_older_cache_is_rebuilt_with_one(tmp_path: Path) -> None:
    import torch

    root = write_folder_dataset(tmp_path / "data", counts={"train": 3})
    source = FolderSource(root, class_names=["background", "square", "disc"])
    files = source.split_files("train")
    cached = load_or_build(tmp_path / "cache", "train", files, 32, 3)
    path = next((tmp_path / "cache").glob("train-*.pt"))
    blob = torch.load(path, weights_only=True)
    assert blob["census"] == cached.census and sum(cached.census["labels"]) == sum(
        h * w for h, w in cached.original_sizes.tolist())
    del blob["census"]
    blob["format"] = 1
    torch.save(blob, path)
    again = load_or_build(tmp_path / "cache", "train", files, 32, 3)
    assert again.census == cached.census
