"""`data=folder`: a dataset of one's own in the layout mmsegmentation users know,
`<root>/<img_dir>/<split>/<id><img_suffix>` beside `<root>/<ann_dir>/<split>/<id><seg_map_suffix>` (ids may hold
sub-folders, e.g. Cityscapes' cities), folders named after the split (`img_dir='{split}'`, `ann_dir='{split}annot'`:
SegNet's layout), or a split listed in a file: one id a line, or an image path and its mask path a line."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segx.core.errors import ConfigError, DatasetUnavailableError
from segx.data.cache import name_list
from segx.data.datamodule import CachedSegmentationDataModule
from segx.data.masks import MaskDecoder, parse_colour
from segx.data.palette import IGNORE_COLOUR, color_map
from segx.data.source import IGNORE_INDEX, SegmentationSource, SplitFiles

log = logging.getLogger(__name__)

CLASS_FILES = ("classes.json", "classes.txt")  # looked for in data.root when data.class_names is not given
MAX_CLASSES = 254  # uint8 masks: 255 is the ignore index, and one value is left for a reduced zero label
CLASS_FILE_FORMS = ('a list of class names; {"classes": [names], "palette": [[r, g, b], ...]}; Supervisely\'s '
                    '{"classes": [{"title": "Water", "color": "#50E3C2"}, ...]}; or {"Water": "#50E3C2", ...} '
                    '(a colour per name, hex or [r, g, b])')


def _class_file_error(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} {what}. segx reads these forms, in class-index order: {CLASS_FILE_FORMS}; or "
                       "classes.txt with one name a line. Fix the file, or give data.class_names (and data.palette).")


def _is_colour(value: Any) -> bool:
    try:
        parse_colour(value, "")
    except ConfigError:
        return False
    return True


def parse_class_file(payload: Any, path: Path) -> tuple[list[str], list[list[int]] | None]:
    """Names and colours from a classes.json payload in one of `CLASS_FILE_FORMS`; never a dict as a name."""
    if isinstance(payload, list):
        if payload and all(isinstance(n, str) for n in payload):
            return list(payload), None
        raise _class_file_error(path, "holds a list whose items are not all class names (strings)")
    if not isinstance(payload, dict) or not payload:
        raise _class_file_error(path, f"holds {type(payload).__name__ if payload else 'nothing'}, not classes")
    classes = payload.get("classes")
    if isinstance(classes, list) and classes and all(isinstance(c, dict) for c in classes):  # Supervisely, CVAT
        titles = [c.get("title", c.get("name")) for c in classes]
        if not all(isinstance(t, str) and t for t in titles):
            raise _class_file_error(path, "lists classes without a \"title\" (or \"name\")")
        colours = [c.get("color", c.get("colour")) for c in classes]
        if all(c is None for c in colours):
            return titles, None
        if not all(c is not None and _is_colour(c) for c in colours):
            raise _class_file_error(path, "gives some classes no colour, or one that is not a colour")
        return titles, [list(parse_colour(c, str(path))) for c in colours]
    if isinstance(classes, list):
        if not classes or not all(isinstance(n, str) for n in classes):
            raise _class_file_error(path, "has a \"classes\" list whose items are not all names")
        palette = payload.get("palette")
        if palette is not None and not (isinstance(palette, list) and all(_is_colour(c) for c in palette)):
            raise _class_file_error(path, "has a \"palette\" that is not a list of colours")
        return list(classes), None if palette is None else [list(parse_colour(c, str(path))) for c in palette]
    if "classes" not in payload and all(_is_colour(v) for v in payload.values()):  # {name: colour}
        return [str(n) for n in payload], [list(parse_colour(c, str(path))) for c in payload.values()]
    raise _class_file_error(path, f"has the keys {', '.join(map(str, list(payload)[:5]))}, in none of the forms")


def read_class_file(root: Path) -> tuple[list[str], list[Any] | None] | None:
    """Class names (and a palette, from JSON) from `root`/classes.json or classes.txt, None when neither exists;
    classes.json may take any of `CLASS_FILE_FORMS`."""
    json_file, text_file = (root / name for name in CLASS_FILES)
    if json_file.is_file():
        try:
            payload = json.loads(json_file.read_text())
        except (OSError, ValueError) as error:
            raise _class_file_error(json_file, f"cannot be read as JSON ({error})") from None
        return parse_class_file(payload, json_file)
    if text_file.is_file():
        names = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"{text_file} is empty; it should name one class a line, in class-index order.")
        return names, None
    return None


BACKGROUND_NAMES = ("background", "_background_", "bg")  # the names `background_index: auto` takes as background


def background_of(names: Sequence[str], background_index: int | str | None) -> int | None:
    """The class `miou_no_bg` leaves out: `auto` finds the one named background (else none, so no real class is
    dropped from a score); an index as given; None: no background class."""
    if background_index == "auto":
        return next((i for i, name in enumerate(names) if name.strip().lower() in BACKGROUND_NAMES), None)
    if background_index is None:
        return None
    try:
        index = int(background_index)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(names):
        raise ConfigError(f"data.background_index={background_index} is not a class index (0..{len(names) - 1}); "
                          "auto: the class named background, if any; null: the dataset has no background class.")
    return index


def line_fields(line: str) -> list[str]:
    """A split list's line as its fields: tab-separated when it holds a tab (paths with spaces, 'Tile 1/x.jpg'),
    else separated by white space."""
    if "\t" in line:
        return [field.strip() for field in line.split("\t") if field.strip()]
    return line.split()


# Colours for unlabelled pixels, in order of preference: VOC's cream, white, magenta, black.
VOID_CANDIDATES = (IGNORE_COLOUR, (255, 255, 255), (255, 0, 255), (0, 0, 0))
VOID_DISTANCE = 100  # the nearest class colour at least this far (Euclidean, 0..255 a channel) tells them apart


def void_colour(class_colours: np.ndarray) -> tuple[int, int, int]:
    """VOC's cream for unlabelled pixels, unless a class is drawn in a colour near it (CamVid's pole is
    [192, 192, 128]): then the first candidate far from every class colour, else the farthest one."""
    classes = np.asarray(class_colours, dtype=np.float64).reshape(-1, 3)

    def distance(candidate: tuple[int, int, int]) -> float:
        return float(np.linalg.norm(classes - np.asarray(candidate), axis=1).min()) if len(classes) else np.inf

    return next((c for c in VOID_CANDIDATES if distance(c) >= VOID_DISTANCE), max(VOID_CANDIDATES, key=distance))


def full_palette(colours: Sequence[Any] | None, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """uint8 [256, 3]: the given colour of each class, else a generated one; the ignore index in `void_colour`."""
    palette = color_map(256)
    for index, colour in enumerate(colours or ()):
        palette[index] = np.asarray(parse_colour(colour, f"data.palette[{index}]"), dtype=np.uint8)
    palette[ignore_index] = void_colour(palette[:num_classes])
    if colours is not None and len(colours) != num_classes:
        raise ConfigError(f"data.palette has {len(colours)} colours for {num_classes} classes; give one [r, g, b] "
                          "per class, in class-index order (or leave it out to have one generated).")
    return palette


class FolderSource(SegmentationSource):
    """Images and masks under `root` as described in the module docstring; classes from the config or a file."""

    def __init__(self, root: str | Path, img_dir: str = "images", ann_dir: str = "annotations",
                 img_suffix: str = ".jpg", seg_map_suffix: str = ".png", split_lists: Mapping[str, str] | None = None,
                 class_names: Sequence[str] | None = None, palette: Sequence[Any] | None = None,
                 ignore_index: int = IGNORE_INDEX, mask_format: str = "auto", reduce_zero_label: bool = False,
                 label_map: Mapping[Any, Any] | None = None, background_index: int | str | None = "auto",
                 val_fraction: float | None = None, val_seed: int = 0, train_split: str = "train",
                 val_split: str = "val", ignore_colours: Sequence[Any] = ()) -> None:
        self.root = Path(root).expanduser().resolve()
        self.train_split, self.val_split = str(train_split), str(val_split)
        self.val_fraction, self.val_seed = check_val_fraction(val_fraction, val_seed, self.train_split,
                                                              self.val_split)
        self.img_dir, self.ann_dir = str(img_dir), str(ann_dir)
        self.img_suffix, self.seg_map_suffix = str(img_suffix), str(seg_map_suffix)
        self.split_lists = dict(split_lists or {})
        self.ignore_index = int(ignore_index)
        if not 0 < self.ignore_index <= 255:
            raise ConfigError(f"data.ignore_index={ignore_index} must be in 1..255 (masks are 8-bit).")
        names, file_palette = list(class_names or ()), None
        if not names and not self.root.is_dir():
            raise DatasetUnavailableError(
                f"data.root={self.root} does not exist, so data=folder finds neither its files nor the names of its "
                "classes there; point data.root= at the dataset's folder (evaluate.py takes data.root= too, for a "
                "checkpoint whose data lives elsewhere on this machine).")
        if not names:
            found = read_class_file(self.root)
            if found is None:
                raise ConfigError(
                    f"data=folder needs the names of its classes: set data.class_names=[background,road,...] (in "
                    f"class-index order), or put classes.txt (one name a line) or classes.json in data.root="
                    f"{self.root}.")
            names, file_palette = found
        if len(names) > MAX_CLASSES:
            raise ConfigError(f"{len(names)} classes is more than segx's masks can hold: at most {MAX_CLASSES} (8-bit "
                              f"masks, {IGNORE_INDEX} the ignore index).")
        if len(names) > self.ignore_index:
            raise ConfigError(f"{len(names)} classes take the indices 0..{len(names) - 1}, which include "
                              f"data.ignore_index={self.ignore_index}; set data.ignore_index to {len(names)} or more "
                              f"(255, the default, suits up to {MAX_CLASSES} classes).")
        self.classes = tuple(str(n) for n in names)
        self.background_index = background_of(self.classes, background_index)
        colours = palette if palette is not None else file_palette
        self.palette = full_palette(colours, len(self.classes), self.ignore_index)
        self.mask_decoder = MaskDecoder.from_config(mask_format, colours, label_map, reduce_zero_label,
                                                    self.ignore_index, ignore_colours)

    def _split_dirs(self, split: str) -> tuple[Path, Path]:
        return split_folder(self.root, self.img_dir, split), split_folder(self.root, self.ann_dir, split)

    def _list_file(self, split: str) -> Path | None:
        name = self.split_lists.get(split)
        if not name:
            return None
        path = self.root / name
        if not path.is_file():
            raise DatasetUnavailableError(f"The {split} split's list file {path} (data.split_lists.{split}) does "
                                          "not exist; write one image id (or an image path and its mask path) per "
                                          f"line there, or drop the key to use every image in "
                                          f"{self._split_dirs(split)[0]}.")
        return path

    def _listed_pairs(self, split: str, path: Path, lines: list[list[str]]) -> SplitFiles:
        """A list of `<image> <mask>` lines (SegNet's train.txt): each path as written, else relative to data.root,
        else by its trailing components under data.root (a list written on another machine)."""
        images, masks, unresolved = [], [], []
        for number, (image_text, mask_text) in enumerate(lines, start=1):
            image, mask = resolve_listed_path(image_text, self.root), resolve_listed_path(mask_text, self.root)
            if image is None or mask is None:
                unresolved.append((number, image_text if image is None else mask_text))
                continue
            images.append(image)
            masks.append(mask)
        if unresolved:
            number, text = unresolved[0]
            raise DatasetUnavailableError(
                f"{len(unresolved)} of the {len(lines)} lines of the {split} list {path} (data.split_lists.{split}) "
                f"name files that cannot be found, the first on line {number}: {text}. A path is taken as written, "
                f"then relative to data.root={self.root}, then by its trailing components under data.root (for "
                f"{text}: {', '.join(str(c) for c in trailing_candidates(text, self.root)[:3]) or 'none'}); point "
                f"data.root at the folder those paths end in, or fix the list.")
        ids = [str(_without_suffix(image.relative_to(self.root) if image.is_relative_to(self.root) else image))
               for image in images]
        return SplitFiles(ids, [str(i) for i in images], [str(m) for m in masks])

    def split_files(self, split: str) -> SplitFiles:
        if self.val_fraction is not None and split in (self.train_split, self.val_split):
            return self._held_out(split)
        return self._listed_split(split)

    def _held_out(self, split: str) -> SplitFiles:
        """data.val_fraction: a seeded share of the train split's files as the val split, the rest as train; the
        val ids are kept in `held_out` (and so in metrics.json)."""
        whole = self._listed_split(self.train_split)
        count = len(whole.ids)
        size = max(1, round(count * self.val_fraction))
        if size >= count:
            raise ConfigError(f"data.val_fraction={self.val_fraction:g} of the {count} {self.train_split} image(s) "
                              "leaves none to train on; lower it, or give the dataset a val split of its own.")
        chosen = set(np.random.default_rng(self.val_seed).permutation(count)[:size].tolist())
        keep = [i for i in range(count) if (i in chosen) == (split == self.val_split)]
        if split == self.val_split and self.held_out is None:
            log.info("data.val_fraction=%g: %d of the %d %s images held out as the %s split (data.val_seed=%d)",
                     self.val_fraction, size, count, self.train_split, self.val_split, self.val_seed)
            self.held_out = {"from": self.train_split, "fraction": self.val_fraction, "seed": self.val_seed,
                             "ids": [whole.ids[i] for i in keep]}
        return SplitFiles(*([column[i] for i in keep] for column in whole))

    def _listed_split(self, split: str) -> SplitFiles:
        images_dir, masks_dir = self._split_dirs(split)
        list_file = self._list_file(split)
        lines = [line_fields(line) for line in list_file.read_text().splitlines() if line.strip()] if list_file else []
        if lines and all(len(line) == 2 for line in lines):
            return self._listed_pairs(split, list_file, lines)
        expected = len(lines[0]) if lines and len(lines[0]) in (1, 2) else 1  # as the first line, throughout
        odd = next((n for n, line in enumerate(lines, start=1) if len(line) != expected), None)
        if odd is not None:
            raise DatasetUnavailableError(
                f"Line {odd} of the {split} list {list_file} (data.split_lists.{split}) holds "
                f"{len(lines[odd - 1])} entries: a list holds one image id a line, or an image path and its mask "
                "path a line, throughout. Paths that hold spaces ('Tile 1/images/x.jpg') are read when a tab "
                "separates the two paths of a line.")
        listed = [line[0] for line in lines] if list_file else None
        if listed is None:
            if not images_dir.is_dir():
                raise DatasetUnavailableError(
                    f"No {split} images: {images_dir} does not exist. data=folder reads <data.root>/<data.img_dir>/"
                    f"<split>/<id>{self.img_suffix} and <data.root>/<data.ann_dir>/<split>/<id>{self.seg_map_suffix}"
                    f" (data.root={self.root}, data.img_dir={self.img_dir}, data.ann_dir={self.ann_dir}); put the "
                    f"files there or point those keys at where they are.{self._no_split_hint(split)}")
            ids = sorted(str(p.relative_to(images_dir))[: -len(self.img_suffix)]
                         for p in images_dir.rglob(f"*{self.img_suffix}") if p.is_file())
            found = masks_dir.rglob(f"*{self.seg_map_suffix}") if masks_dir.is_dir() else ()
            masks = {str(p.relative_to(masks_dir))[: -len(self.seg_map_suffix)] for p in found if p.is_file()}
            orphans = sorted(masks - set(ids))
        else:
            ids, orphans = listed, []
        images = [str(images_dir / f"{i}{self.img_suffix}") for i in ids]
        mask_files = [str(masks_dir / f"{i}{self.seg_map_suffix}") for i in ids]
        no_image = [i for i, path in zip(ids, images, strict=True) if not Path(path).is_file()]
        no_mask = [i for i, path in zip(ids, mask_files, strict=True) if not Path(path).is_file()]
        problems = []
        if no_image:
            problems.append(f"{len(no_image)} listed id(s) without an image in {images_dir}: {name_list(no_image)}")
        if no_mask:
            problems.append(f"{len(no_mask)} image(s) without a mask in {masks_dir}: "
                            f"{name_list([f'{i}{self.seg_map_suffix}' for i in no_mask])}")
        if orphans:
            problems.append(f"{len(orphans)} mask(s) without an image in {images_dir}: "
                            f"{name_list([f'{i}{self.img_suffix}' for i in orphans])}")
        if problems:
            raise DatasetUnavailableError(
                f"The {split} split under data.root={self.root} does not pair every image with a mask: "
                f"{'; '.join(problems)}. Add the missing files or remove the strays (each image needs "
                f"<id>{self.seg_map_suffix} under {masks_dir}), and run again.")
        if not ids:
            raise DatasetUnavailableError(f"The {split} split has no image: nothing in {images_dir} ends with "
                                          f"data.img_suffix={self.img_suffix!r}.")
        return SplitFiles(ids, images, mask_files)

    def _no_split_hint(self, split: str) -> str:
        if split != self.val_split:
            return ""
        return (f" A dataset without a {split} split can hold out part of {self.train_split} with data.val_fraction="
                f"0.1 (seeded by data.val_seed), or list the files of each split with data.split_lists="
                f"{{{self.train_split}: train.txt, {split}: val.txt}}.")

    def bad_files_fix(self, split: str) -> str:
        return (f"Replace these files with good ones, or remove them (image and mask) from "
                f"{self.root}, and run again.")


def check_val_fraction(fraction: Any, seed: Any, train_split: str,
                       val_split: str) -> tuple[float | None, int]:
    """`data.val_fraction` (null, or in (0, 1)) and `data.val_seed` (a whole number), checked."""
    if fraction is None:
        return None, 0
    try:
        value, seed = float(fraction), int(seed)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise ConfigError(f"data.val_fraction={fraction} must be null (the dataset's own val split) or in (0, 1), "
                          "the share of the train split held out as val, e.g. 0.1; data.val_seed a whole number.")
    if train_split == val_split:
        raise ConfigError(f"data.val_fraction holds out part of data.train_split={train_split} as the val split, "
                          f"but data.val_split is {val_split} too; leave data.val_split at val.")
    return value, int(seed)


SPLIT_FIELD = "{split}"  # in data.img_dir / data.ann_dir: the split's name goes there (SegNet's '{split}annot')


def split_folder(root: Path, folder: str, split: str) -> Path:
    """`<root>/<folder>/<split>` (mmsegmentation's layout), or `<root>/<folder>` with `{split}` replaced by the
    split when the folder is a template of it (`{split}`, `{split}annot`: SegNet's train/ and trainannot/)."""
    return root / folder.replace(SPLIT_FIELD, split) if SPLIT_FIELD in folder else root / folder / split


def trailing_candidates(text: str, root: Path) -> list[Path]:
    """Where a listed path's trailing components would lie under `root`, the longest first."""
    path = Path(text)
    parts = path.parts[1:] if path.is_absolute() else path.parts
    return [root.joinpath(*parts[start:]) for start in range(len(parts))]


def resolve_listed_path(text: str, root: Path) -> Path | None:
    """A file a split list names: as written, else relative to `root`, else the longest trailing part of it that
    exists under `root`; None when none does."""
    path = Path(text).expanduser()
    if path.is_absolute() and path.is_file():
        return path
    return next((candidate for candidate in trailing_candidates(text, root) if candidate.is_file()), None)


def _without_suffix(path: Path) -> Path:
    return path.with_suffix("") if path.suffix else path


class FolderDataModule(CachedSegmentationDataModule):
    """`data=folder`: a `FolderSource` behind the cached data module; `options` are the module's."""

    def __init__(self, root: str = "data/custom", img_dir: str = "images", ann_dir: str = "annotations",
                 img_suffix: str = ".jpg", seg_map_suffix: str = ".png", split_lists: Mapping[str, str] | None = None,
                 class_names: Sequence[str] | None = None, palette: Sequence[Any] | None = None,
                 ignore_index: int = IGNORE_INDEX, mask_format: str = "auto", reduce_zero_label: bool = False,
                 label_map: Mapping[Any, Any] | None = None, background_index: int | str | None = "auto",
                 val_fraction: float | None = None, val_seed: int = 0, ignore_colours: Sequence[Any] = (),
                 num_classes: int | None = None, **options: Any) -> None:
        source = FolderSource(root, img_dir, ann_dir, img_suffix, seg_map_suffix, split_lists, class_names, palette,
                              ignore_index, mask_format, reduce_zero_label, label_map, background_index,
                              val_fraction, val_seed, options.get("train_split", "train"),
                              options.get("val_split", "val"), ignore_colours)
        super().__init__(source=source, num_classes=num_classes, **options)


__all__ = ["FolderDataModule", "FolderSource", "read_class_file", "parse_class_file", "full_palette"]
