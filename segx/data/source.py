"""The seam between a dataset on disk and the cached data module: what a source must say about its files."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from segx.data.masks import MaskDecoder

IGNORE_INDEX = 255  # the mask value loss and metrics skip: VOC's void, and the pad of a rescaled batch


class SplitFiles(NamedTuple):
    """A split as listed by its source: parallel lists of ids, image paths and mask paths."""

    ids: list[str]
    images: list[str]
    masks: list[str]


class SegmentationSource(ABC):
    """Lists a split's files and names its classes; `CachedSegmentationDataModule` does the rest.

    `split_files` raises SegxError in one paragraph when the layout under `root` is missing or incomplete
    (naming each missing path and the fix), so the module and the cache never guess at a layout.
    """

    root: Path  # the folder `data.root` names: used in messages, and as the default home of the cache
    classes: tuple[str, ...]
    palette: np.ndarray  # uint8 [256, 3]: the colour each label is drawn with
    ignore_index: int = IGNORE_INDEX
    splits: tuple[str, ...] | None = None  # the split names it knows, when they are fixed; None: any name
    mask_decoder: MaskDecoder | None = None  # how its mask files read as class ids; None: index images as they are
    background_index: int | None = 0  # the class miou_no_bg leaves out; None: the dataset has no background
    held_out: dict | None = None  # a val split held out of train: {"from", "fraction", "seed", "ids"}, once listed

    def prepare(self) -> None:
        """Make the files exist (download, generate); called before any split is listed, so it must be cheap
        when they already do and safe when parallel sweep jobs call it at once."""
        return None  # a source over files the user put in place has nothing to do

    @abstractmethod
    def split_files(self, split: str) -> SplitFiles:
        """Every (id, image, mask) of `split`, each file checked to exist; SegxError saying what is missing."""

    @abstractmethod
    def bad_files_fix(self, split: str) -> str:
        """The sentence that ends a "bad files" message: how to replace the files or leave them out of `split`."""


__all__ = ["IGNORE_INDEX", "SplitFiles", "SegmentationSource"]
