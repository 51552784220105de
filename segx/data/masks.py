"""How a dataset's mask files become class indices: index images (palette or greyscale) or colour images matched
against the palette (a palette PNG is read by its colours when the user gives a palette), then an optional remapping
(`label_map`, of values or of colours) and `reduce_zero_label` (ADE20K's 0 is "other": it becomes the ignore index
and every other id moves down by one). `read` also counts the file's raw values, for the label census."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segx.core.errors import ConfigError
from segx.data.source import IGNORE_INDEX

MASK_FORMATS = ("auto", "index", "rgb")


class MaskProblem(ValueError):
    """A mask that cannot be read as class indices: `problem` is a key of segx.data.cache.PROBLEMS; `values` the
    offending raw values (colour codes 0xRRGGBB for colours), so a split-wide convention can be told from damage."""

    def __init__(self, problem: str, detail: str, values: tuple[int, ...] = ()) -> None:
        super().__init__(detail)
        self.problem, self.detail, self.values = problem, detail, values


HEX_COLOUR = re.compile(r"#?([0-9a-fA-F]{6})")


def parse_colour(value: Any, name: str) -> tuple[int, int, int]:
    """A colour given as [r, g, b] or as a hex string ('#50E3C2', as annotation tools write them)."""
    if isinstance(value, str):
        match = HEX_COLOUR.fullmatch(value.strip())
        if match is None:
            raise ConfigError(f"{name}: {value!r} is not a colour; give [r, g, b] with each of 0..255, or a hex "
                              "string such as '#50E3C2'.")
        digits = match.group(1)
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
    try:
        rgb = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ConfigError(f"{name}: {value!r} is not a colour; give [r, g, b] with each of 0..255, or a hex string "
                          "such as '#50E3C2'.")
    return rgb  # type: ignore[return-value]


def _is_colour_key(key: Any) -> bool:
    return isinstance(key, str) and key.strip().startswith("#")


def check_label_map(label_map: Mapping[Any, Any] | None,
                    ignore_index: int = IGNORE_INDEX) -> tuple[dict[int, int], dict[tuple[int, int, int], int]]:
    """`data.label_map` as ({mask value: class index}, {colour: class index}): keys are whole numbers (values of
    index masks) or hex colours ('#9B9B9B', colours of colour masks); targets are class indices or the ignore index."""
    values: dict[int, int] = {}
    colours: dict[tuple[int, int, int], int] = {}
    for key, value in (label_map or {}).items():
        try:
            new = int(value)
            old = None if _is_colour_key(key) else int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"data.label_map: {key!r}: {value!r} must map a mask value (a whole number) or a colour "
                              f"('#9B9B9B') to a class index or {ignore_index} (ignored).") from None
        if not 0 <= new <= 255 or (old is not None and not 0 <= old <= 255):
            raise ConfigError(f"data.label_map: {key}: {new} is out of range; mask values and class indices are "
                              f"0..255 ({ignore_index} marks ignored pixels).")
        if old is None:
            colours[parse_colour(key, f"data.label_map key {key!r}")] = new
        else:
            values[old] = new
    return values, colours


def _code(rgb: Sequence[int]) -> int:
    return (int(rgb[0]) << 16) | (int(rgb[1]) << 8) | int(rgb[2])


def _hex_of_code(code: int) -> str:
    return f"#{code:06X}"


def _counts(keys: np.ndarray, counts: np.ndarray, name: Any) -> dict[str, int]:
    return {name(int(k)): int(n) for k, n in zip(keys, counts, strict=True) if n}


@dataclass(frozen=True)
class MaskDecoder:
    """Reads one mask image into uint8 class indices; `key` names the decoding in the cache's file name, so a
    changed setting never reuses masks decoded the old way."""

    mask_format: str = "index"  # index: palette or greyscale PNGs of class ids; rgb: colours of `colours`; auto:
                                #   greyscale images as class ids, colour and palette images by their colours when
                                #   `colours` (or colour keys of label_map) are given, palette indices otherwise
    colours: tuple[tuple[int, int, int], ...] = ()  # rgb: class i's colour
    label_map: tuple[tuple[int, int], ...] = ()
    colour_map: tuple[tuple[tuple[int, int, int], int], ...] = ()  # colours that are no class's: their class index
                                                                   #   (or the ignore index)
    reduce_zero_label: bool = False
    ignore_index: int = IGNORE_INDEX
    _lookup: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mask_format not in MASK_FORMATS:
            raise ConfigError(f"data.mask_format={self.mask_format!r} is not a choice; use auto (index images read as "
                              "class ids, colour images through data.palette), index (class ids in a palette or "
                              "greyscale image) or rgb (colours of data.palette).")
        if self.mask_format == "rgb" and not (self.colours or self.colour_map):
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
                    ignore_index: int = IGNORE_INDEX, ignore_colours: Sequence[Any] = ()) -> MaskDecoder:
        colours = tuple(parse_colour(c, f"data.palette[{i}]") for i, c in enumerate(palette or ()))
        values, colour_map = check_label_map(label_map, ignore_index)
        for i, colour in enumerate(ignore_colours or ()):  # the command line's form of {'#9B9B9B': ignore_index}
            colour_map.setdefault(parse_colour(colour, f"data.ignore_colours[{i}]"), int(ignore_index))
        return cls(mask_format=str(mask_format), colours=colours if mask_format in ("rgb", "auto") else (),
                   label_map=tuple(sorted(values.items())), colour_map=tuple(sorted(colour_map.items())),
                   reduce_zero_label=bool(reduce_zero_label), ignore_index=int(ignore_index))

    @property
    def reads_colours(self) -> bool:
        """Whether colour and palette images are matched by colour (`rgb`, or `auto` with colours given)."""
        return self.mask_format == "rgb" or (self.mask_format == "auto" and bool(self.colours or self.colour_map))

    @property
    def key(self) -> str:
        """'' for plain index masks (the caches VOC and shapes always had), else a short hash of the settings."""
        if not self.reads_colours and not self.label_map and not self.reduce_zero_label:
            return ""
        settings = [self.mask_format, self.colours, self.label_map, self.reduce_zero_label, self.ignore_index,
                    *([self.colour_map] if self.colour_map else [])]
        return hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:8]

    def decode(self, mask: Any) -> np.ndarray:
        """A PIL image → uint8 [H, W] class indices (or the ignore index); MaskProblem when it cannot be read so."""
        return self.read(mask)[0]

    def read(self, mask: Any) -> tuple[np.ndarray, dict[str, int], str]:
        """A PIL image → (uint8 [H, W] class indices, pixels per raw value of the file, how it was read).

        Raw values are the file's own: '255' for index images, '#50E3C2' for colours; the reading says which,
        e.g. 'P by colour' (a palette PNG whose colours were matched against data.palette)."""
        if self.reads_colours and mask.mode in ("RGB", "RGBA", "P", "PA"):
            # A palette PNG's indices follow the order its tool met the colours in, which differs between files:
            # when the user names the colours, the colours are what the file means.
            rgb = np.asarray(mask.convert("RGB"), dtype=np.uint8)
            codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
            found, counts = np.unique(codes, return_counts=True)
            return self._from_colours(codes, found), _counts(found, counts, _hex_of_code), f"{mask.mode} by colour"
        if self.mask_format == "rgb":
            raise MaskProblem("mode", f"mode {mask.mode}, not a colour image")
        if mask.mode not in ("P", "L"):
            raise MaskProblem("mode", f"mode {mask.mode}")
        values = np.array(mask, dtype=np.uint8)
        raw = np.bincount(values.ravel(), minlength=256)
        how = "P by palette index" if mask.mode == "P" else "L by value"
        return self._lookup[values], _counts(np.arange(256), raw, str), how

    def _from_colours(self, codes: np.ndarray, present: np.ndarray) -> np.ndarray:
        """Class indices of int32 colour codes (`present`: the sorted codes found): a class's colour gives its index,
        then label_map and reduce_zero_label apply; a colour of `colour_map` gives its mapped value as it is (the
        ignore index must not move under reduce_zero_label)."""
        table = {_code(rgb): index for index, rgb in enumerate(self.colours)}
        mapped = {_code(rgb): value for rgb, value in self.colour_map}
        unknown = [int(c) for c in present if int(c) not in table and int(c) not in mapped]
        if unknown:
            shown = ", ".join(f"{_hex_of_code(c)} [{c >> 16}, {(c >> 8) & 255}, {c & 255}]" for c in unknown[:3])
            raise MaskProblem("colour", f"colours {shown}{', ...' if len(unknown) > 3 else ''}", tuple(unknown))
        per_code = np.array([self._lookup[table[int(c)]] if int(c) in table else mapped[int(c)] for c in present],
                            dtype=np.uint8)
        return per_code[np.searchsorted(present, codes)]
