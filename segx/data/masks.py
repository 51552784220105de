"""How a dataset's mask files become class indices: index images (palette or greyscale) or RGB colour images
matched against the palette, then an optional id remapping (`label_map`) and `reduce_zero_label` (ADE20K's 0 is
"other": it becomes the ignore index and every other id moves down by one)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segx.core.errors import ConfigError
from segx.data.source import IGNORE_INDEX

MASK_FORMATS = ("auto", "index", "rgb")


class MaskProblem(ValueError):
    """A mask that cannot be read as class indices: `problem` is a key of segx.data.cache.PROBLEMS."""

    def __init__(self, problem: str, detail: str) -> None:
        super().__init__(detail)
        self.problem, self.detail = problem, detail


def _colour(value: Any, name: str) -> tuple[int, int, int]:
    try:
        rgb = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"{name}: {value!r} is not a colour; give [r, g, b] with each of 0..255.")
    return rgb  # type: ignore[return-value]


def check_label_map(label_map: Mapping[Any, Any] | None, ignore_index: int = IGNORE_INDEX) -> dict[int, int]:
    """`data.label_map` ({file id: class index}) as ints in 0..255."""
    checked: dict[int, int] = {}
    for key, value in (label_map or {}).items():
        try:
            old, new = int(key), int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"data.label_map: {key!r}: {value!r} must map a mask value to a class index (both "
                              "whole numbers).") from None
        if not (0 <= old <= 255 and (0 <= new <= 255)):
            raise ConfigError(f"data.label_map: {old}: {new} is out of range; mask values and class indices are "
                              f"0..255 ({ignore_index} marks ignored pixels).")
        checked[old] = new
    return checked


@dataclass(frozen=True)
class MaskDecoder:
    """Reads one mask image into uint8 class indices; `key` names the decoding in the cache's file name, so a
    changed setting never reuses masks decoded the old way."""

    mask_format: str = "index"  # index: palette or greyscale PNGs of class ids; rgb: colours of `colours`; auto:
                                #   index for P and L images, colours of `colours` for RGB ones
    colours: tuple[tuple[int, int, int], ...] = ()  # rgb: class i's colour
    label_map: tuple[tuple[int, int], ...] = ()
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    _lookup: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise ConfigError(f"data.mask_format={self.mask_format!r} is not a choice; use auto (index images read as "
                              "class ids, colour images through data.palette), index (class ids in a palette or "
                              "greyscale image) or rgb (colours of data.palette).")
        if self.mask_format == "rgb" and not self.colours:
            raise ConfigError("data.mask_format=rgb needs data.palette: the [r, g, b] colour of each class, in class "
                              "order, exactly as the mask files draw them.")
        lookup = np.arange(256, dtype=np.uint8)  # file value → class index, after label_map and reduce_zero_label
        for old, new in self.label_map:
            lookup[old] = new
        if self.reduce_zero_label:
            reduced = lookup.astype(np.int16) - 1
            reduced[lookup == 0] = self.ignore_index
            reduced[lookup == self.ignore_index] = self.ignore_index
            lookup = reduced.astype(np.uint8)
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def from_config(cls, mask_format: str = "index", palette: Sequence[Any] | None = None,
                    label_map: Mapping[Any, Any] | None = None, reduce_zero_label: bool = False,
                    ignore_index: int = IGNORE_INDEX) -> MaskDecoder:
        colours = tuple(_colour(c, f"data.palette[{i}]") for i, c in enumerate(palette or ()))
        mapping = check_label_map(label_map, ignore_index)
        return cls(mask_format=str(mask_format), colours=colours if mask_format in ("rgb", "auto") else (),
                   label_map=tuple(sorted(mapping.items())), reduce_zero_label=bool(reduce_zero_label),
                   ignore_index=int(ignore_index))

    @property
    def key(self) -> str:
        """'' for plain index masks (the caches VOC and shapes always had), else a short hash of the settings."""
        plain = self.mask_format == "index" or (self.mask_format == "auto" and not self.colours)
        if plain and not self.label_map and not self.reduce_zero_label:
            return ""
        settings = [self.mask_format, self.colours, self.label_map, self.reduce_zero_label, self.ignore_index]
        return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:8]

    def decode(self, mask: Any) -> np.ndarray:
        """A PIL image → uint8 [H, W] class indices (or the ignore index); MaskProblem when it cannot be read so."""
        colour = self.mask_format == "auto" and self.colours and mask.mode in ("RGB", "RGBA")
        if self.mask_format == "rgb" or colour:
            if mask.mode not in ("RGB", "RGBA", "P"):
                raise MaskProblem("mode", f"mode {mask.mode}, not a colour image")
            values = self._from_colours(np.asarray(mask.convert("RGB"), dtype=np.uint8))
        elif mask.mode in ("P", "L"):
            values = np.array(mask, dtype=np.uint8)
        else:
            raise MaskProblem("mode", f"mode {mask.mode}")
        return self._lookup[values]

    def _from_colours(self, rgb: np.ndarray) -> np.ndarray:
        codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
        known = np.array([(r << 16) | (g << 8) | b for r, g, b in self.colours], dtype=np.int32)
        order = np.argsort(known)
        position = np.clip(np.searchsorted(known[order], codes), 0, len(known) - 1)
        found = known[order][position] == codes
        if not found.all():
            unknown = np.unique(codes[~found])
            shown = ", ".join(f"[{c >> 16}, {(c >> 8) & 255}, {c & 255}]" for c in unknown[:3])
            raise MaskProblem("colour", f"colours {shown}{', ...' if len(unknown) > 3 else ''}")
        return order[position].astype(np.uint8)
