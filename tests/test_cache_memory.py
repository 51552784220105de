"""A cached split is mapped from its file, not copied into each job's memory, and counting its classes does not
copy it either."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from segx.data.cache import load_or_build
from segx.data.datamodule import FREQUENCY_CHUNK, class_frequencies
from tests.conftest import shapes_split_files


def _mapped_files() -> set[str]:
    """The files this process has mapped into its memory."""
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def test_a_written_cache_is_mapped_not_read(shapes_root: Path, tmp_path: Path) -> None:
    files = shapes_split_files(shapes_root, "val")
    built = load_or_build(tmp_path, "val", files, 32, num_classes=21)  # the first job decodes and writes it
    (cache_file,) = tmp_path.glob("val-32px-*.pt")
    assert str(cache_file) not in _mapped_files()
    loaded = load_or_build(tmp_path, "val", files, 32, num_classes=21)  # every later job maps it
    assert str(cache_file) in _mapped_files()
    assert torch.equal(loaded.images, built.images) and torch.equal(loaded.masks, built.masks)
    assert loaded.images[:4].float().mean() == built.images[:4].float().mean()  # a batch reads as before


def test_class_frequencies_count_in_chunks_exactly() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 21, (FREQUENCY_CHUNK * 2 + 7, 8, 8), dtype=torch.uint8, generator=generator)
    masks[::5, :2] = 255  # ignored pixels
    labelled = masks[masks != 255].long()
    expected = torch.bincount(labelled, minlength=21).double() / labelled.numel()
    assert torch.equal(class_frequencies(masks, 21), expected)


def test_the_readmes_cache_cost_table_matches_the_presets_and_the_cache_files(shapes_root: Path,
                                                                               tmp_path: Path) -> None:
    """Each preset's row gives its default image_size and 4 bytes a pixel; a written cache is that size."""
    import re

    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (\d+) \| ([\d,]+) images?[^|]*?, ([\d.]+) (MB|GB) \|", readme, re.MULTILINE)
    rows += re.findall(r"^\| `(\w+)` \| (\d+) \| ([\d,]+), ([\d.]+) (MB|GB) \|", readme, re.MULTILINE)
    assert {name for name, *_ in rows} == {"shapes", "voc", "voc_aug", "cityscapes", "ade20k"}
    for name, size, images, amount, unit in rows:
        preset = OmegaConf.load(root / "conf" / "data" / f"{name}.yaml")
        default = preset.get("image_size") or OmegaConf.load(root / "conf" / "data" / "voc.yaml").image_size
        assert int(size) == default, name
        expected = int(images.replace(",", "")) * 4 * int(size) ** 2 / (1e6 if unit == "MB" else 1e9)
        assert float(amount) == pytest.approx(expected, rel=0.01), name
    files = shapes_split_files(shapes_root, "val")
    load_or_build(tmp_path, "val", files, 32, num_classes=21)
    (cache_file,) = tmp_path.glob("val-32px-*.pt")
    assert 4 * 32 ** 2 * len(files) <= cache_file.stat().st_size <= 4 * 32 ** 2 * len(files) + 64_000
