"""A cached split is mapped from its file, not copied into each job's memory, and counting its classes does not
copy it either."""

from __future__ import annotations

from pathlib import Path

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
