"""The label census: what a split's masks hold, per class, ignored and per raw file value, shown before training and
checked for what cannot be meant (a class never labelled, a split mostly ignored, 0/255 binary masks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from segx.core.errors import ConfigError

IGNORED = "ignored"  # the census's key for pixels of the ignore index
ANY = "any"  # data.absent_classes=any: no class needs a labelled pixel (a small subset of a large dataset)
RAW_SHOWN = 6  # raw values named in a message or the table, the most frequent first


@dataclass(frozen=True)
class LabelCensus:
    """One split's census: `pixels` per class name then `ignored`, the files' `raw` values (before any mapping,
    '255' or '#50E3C2') with their pixels, and how many masks were read each way (`readings`)."""

    split: str
    pixels: dict[str, int]
    raw: dict[str, int]
    readings: dict[str, int]
    masks: int

    @classmethod
    def from_counts(cls, split: str, counts: dict, class_names: Sequence[str], ignore_index: int) -> LabelCensus:
        """From a cache's census (`segx.data.cache.MaskCensus.as_dict`)."""
        labels = counts["labels"]
        pixels = {str(name): int(labels[index]) for index, name in enumerate(class_names)}
        pixels[IGNORED] = int(labels[ignore_index])
        raw = {str(k): int(v) for k, v in counts["raw"].items()}
        if counts.get("raw_other"):
            raw["other values"] = int(counts["raw_other"])
        readings = {str(k): int(v) for k, v in counts["readings"].items()}
        return cls(split, pixels, raw, readings, sum(readings.values()))

    @property
    def total(self) -> int:
        return sum(self.pixels.values())

    @property
    def ignored_share(self) -> float:
        return self.pixels[IGNORED] / self.total if self.total else 0.0

    def share(self, pixels: int) -> float:
        return pixels / self.total if self.total else 0.0

    def raw_text(self, limit: int = RAW_SHOWN) -> str:
        """'0 (20.1%), 255 (79.9%)': the files' own values, the most frequent first."""
        ranked = sorted(self.raw.items(), key=lambda item: (-item[1], item[0]))
        shown = ", ".join(f"{value} ({100 * self.share(n):.1f}%)" for value, n in ranked[:limit])
        return shown + (f" and {len(ranked) - limit} more" if len(ranked) > limit else "")

    def readings_text(self) -> str:
        """'61 RGB by colour, 2 P by colour': how the split's masks were read."""
        return ", ".join(f"{n} {how}" for how, n in sorted(self.readings.items(), key=lambda item: -item[1]))


def census_table(censuses: Sequence[LabelCensus]) -> list[str]:
    """The census as console lines: one row per class and `ignored`, one column of pixels (and %) per split, then
    each split's raw values and readings."""
    names = list(censuses[0].pixels)
    width = max(len(name) for name in [*names, "class"])
    columns = [f"{c.split} ({c.masks} masks)" for c in censuses]
    cells = {c.split: [f"{c.pixels[n]:,} {100 * c.share(c.pixels[n]):5.1f}%" for n in names] for c in censuses}
    widths = [max(len(col), *(len(x) for x in cells[c.split])) for col, c in zip(columns, censuses, strict=True)]
    lines = ["  ".join([f"{'class':<{width}}", *(f"{col:>{w}}" for col, w in zip(columns, widths, strict=True))])]
    for row, name in enumerate(names):
        lines.append("  ".join([f"{name:<{width}}", *(f"{cells[c.split][row]:>{w}}"
                                                        for c, w in zip(censuses, widths, strict=True))]))
    for census in censuses:
        lines.append(f"{census.split} masks: raw values {census.raw_text()}; read as {census.readings_text()}")
    return lines


def census_record(censuses: Sequence[LabelCensus]) -> dict[str, dict[str, int]]:
    """`metrics.json`'s `label_census`: {split: {class name: pixels, ..., "ignored": pixels}}."""
    return {census.split: dict(census.pixels) for census in censuses}


def _binary_0_255(census: LabelCensus, class_names: Sequence[str], ignore_index: int) -> bool:
    """Masks whose only values are 0 and 255 (the ignore index), with two classes: a binary dataset's usual export."""
    values = {value for value, n in census.raw.items() if n}
    return len(class_names) == 2 and ignore_index == 255 and values == {"0", "255"}


def check_census(train: LabelCensus, class_names: Sequence[str], ignore_index: int,
                 absent_classes: Sequence[str] = (), max_ignored_fraction: float = 0.5) -> None:
    """Refuse a training split that cannot be what its user meant, in one paragraph naming what was seen and the
    key that fixes it or accepts it: classes with no labelled pixel, most pixels ignored, 0/255 binary masks."""
    seen = (f"The {train.split} split's {train.masks} masks hold the raw values {train.raw_text()} (read as "
            f"{train.readings_text()})")
    accepted = class_names if ANY in absent_classes else absent_classes
    missing = [name for name in class_names if train.pixels[name] == 0 and name not in accepted]
    if missing and _binary_0_255(train, class_names, ignore_index):
        raise ConfigError(
            f"{seen}: only 0 and 255. 255 is the ignore value (data.ignore_index), so class {class_names[1]!r} has no "
            f"labelled pixel, and training would learn nothing about it ({100 * train.ignored_share:.1f}% of the "
            f"pixels unscored). Binary masks are often stored as 0/255: set data.label_map={{255: 1}} to read 255 as "
            f"{class_names[1]!r}. If 255 really marks unlabelled pixels, accept it with "
            f"data.absent_classes=[{class_names[1]}].")
    if missing:
        names = ", ".join(repr(n) for n in missing)
        raise ConfigError(
            f"{seen}, and class(es) {names} of data.class_names have no labelled pixel among them, so a network cannot "
            f"learn them. Check that data.class_names is in the masks' index order, and data.label_map or "
            f"data.palette against the raw values above (the census table above has every class). To train anyway "
            f"(a class that appears only in val or test), set data.absent_classes=[{', '.join(missing)}] (or "
            f"data.absent_classes={ANY}: a small subset of a dataset).")
    if train.ignored_share > max_ignored_fraction:
        raise ConfigError(
            f"{seen}, and {100 * train.ignored_share:.1f}% of their pixels are ignored (the value "
            f"data.ignore_index={ignore_index} after mapping), more than data.max_ignored_fraction="
            f"{max_ignored_fraction:g}: most of every image would train nothing. If some of those values are classes, "
            f"map them with data.label_map (e.g. data.label_map={{255: 1}}). To train anyway, raise "
            f"data.max_ignored_fraction (e.g. 0.9).")


def check_label_options(absent_classes: Sequence[str] | None, max_ignored_fraction: float,
                        class_names: Sequence[str]) -> tuple[tuple[str, ...], float]:
    """`data.absent_classes` (names of data.class_names) and `data.max_ignored_fraction` (in [0, 1]), checked."""
    if isinstance(absent_classes, str):  # `any`, or one name given without its list
        absent_classes = [absent_classes]
    absent = tuple(str(n) for n in (absent_classes or ()))
    unknown = [n for n in absent if n not in class_names and n != ANY]
    if unknown:
        raise ConfigError(f"data.absent_classes names {', '.join(repr(n) for n in unknown)}, which is not a class; "
                          f"choose among {', '.join(class_names)}, or give {ANY} to accept every class absent.")
    try:
        fraction = float(max_ignored_fraction)
    except (TypeError, ValueError):
        fraction = float("nan")
    if not 0 <= fraction <= 1:
        raise ConfigError(f"data.max_ignored_fraction={max_ignored_fraction} must be in [0, 1] (the default 0.5 "
                          "refuses a training split more than half ignored; 1 accepts any).")
    return absent, fraction


__all__ = ["IGNORED", "LabelCensus", "census_record", "census_table", "check_census", "check_label_options"]
