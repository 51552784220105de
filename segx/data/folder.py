"""`data=folder`: a dataset of one's own in the layout mmsegmentation users know,
`<root>/<img_dir>/<split>/<id><img_suffix>` beside `<root>/<ann_dir>/<split>/<id><seg_map_suffix>` (ids may hold
sub-folders, e.g. Cityscapes' cities), folders named after the split (`img_dir='{split}'`, `ann_dir='{split}annot'`:
SegNet's layout), or a split listed in a file: one id a line, or an image path and its mask path a line."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segx.core.errors import ConfigError, DatasetUnavailableError
from segx.data.cache import name_list
from segx.data.datamodule import CachedSegmentationDataModule
from segx.data.masks import MaskDecoder
from segx.data.palette import IGNORE_COLOUR, color_map
from segx.data.source import IGNORE_INDEX, SegmentationSource, SplitFiles

CLASS_FILES = ("classes.json", "classes.txt")  # looked for in data.root when data.class_names is not given
MAX_CLASSES = 254  # uint8 masks: 255 is the ignore index, and one value is left for a reduced zero label


def read_class_file(root: Path) -> tuple[list[str], list[Any] | None] | None:
    """Class names (and a palette, from JSON) from `root`/classes.json or classes.txt, None when neither exists.

    classes.json: a list of names, or {"classes": [...], "palette": [[r, g, b], ...]}; classes.txt: one name a line.
    """
    json_file, text_file = (root / name for name in CLASS_FILES)
    if json_file.is_file():
        try:
            payload = json.loads(json_file.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{json_file} cannot be read as JSON ({error}); it should hold a list of class names "
                              'or {"classes": [...], "palette": [[r, g, b], ...]}.') from None
        names, palette = (payload, None) if isinstance(payload, list) else (payload.get("classes"),
                                                                             payload.get("palette"))
        if not isinstance(names, list) or not names:
            raise ConfigError(f"{json_file} names no classes; it should hold a list of class names or "
                              '{"classes": [...], "palette": [[r, g, b], ...]}.')
        return [str(n) for n in names], palette
    if text_file.is_file():
        names = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
        if not names:
            raise ConfigError(f"{text_file} is empty; it should name one class a line, in class-index order.")
        return names, None
    return None


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
        palette[index] = np.asarray([int(c) for c in colour], dtype=np.uint8)
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
                 label_map: Mapping[Any, Any] | None = None, background_index: int | None = 0) -> None:
        self.root = Path(root).expanduser().resolve()
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
        if background_index is not None and not 0 <= int(background_index) < len(self.classes):
            raise ConfigError(f"data.background_index={background_index} is not a class index (0..{len(names) - 1}); "
                              "null: the dataset has no background class.")
        self.background_index = None if background_index is None else int(background_index)
        colours = palette if palette is not None else file_palette
        self.palette = full_palette(colours, len(self.classes), self.ignore_index)
        self.mask_decoder = MaskDecoder.from_config(mask_format, colours, label_map, reduce_zero_label,
                                                    self.ignore_index)

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
        images_dir, masks_dir = self._split_dirs(split)
        list_file = self._list_file(split)
        lines = [line.split() for line in list_file.read_text().splitlines() if line.strip()] if list_file else []
        if lines and all(len(line) == 2 for line in lines):
            return self._listed_pairs(split, list_file, lines)
        expected = len(lines[0]) if lines and len(lines[0]) in (1, 2) else 1  # as the first line, throughout
        odd = next((n for n, line in enumerate(lines, start=1) if len(line) != expected), None)
        if odd is not None:
            raise DatasetUnavailableError(
                f"Line {odd} of the {split} list {list_file} (data.split_lists.{split}) holds "
                f"{len(lines[odd - 1])} entries: a list holds one image id a line, or an image path and its mask "
                "path a line, throughout.")
        listed = [line[0] for line in lines] if list_file else None
        if listed is None:
            if not images_dir.is_dir():
                raise DatasetUnavailableError(
                    f"No {split} images: {images_dir} does not exist. data=folder reads <data.root>/<data.img_dir>/"
                    f"<split>/<id>{self.img_suffix} and <data.root>/<data.ann_dir>/<split>/<id>{self.seg_map_suffix}"
                    f" (data.root={self.root}, data.img_dir={self.img_dir}, data.ann_dir={self.ann_dir}); put the "
                    "files there or point those keys at where they are.")
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

    def bad_files_fix(self, split: str) -> str:
        return (f"Replace these files with good ones, or remove them (image and mask) from "
                f"{self.root}, and run again.")


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
                 label_map: Mapping[Any, Any] | None = None, background_index: int | None = 0,
                 num_classes: int | None = None, **options: Any) -> None:
        source = FolderSource(root, img_dir, ann_dir, img_suffix, seg_map_suffix, split_lists, class_names, palette,
                              ignore_index, mask_format, reduce_zero_label, label_map, background_index)
        super().__init__(source=source, num_classes=num_classes, **options)


__all__ = ["FolderDataModule", "FolderSource", "read_class_file", "full_palette"]
