"""Cached tensor store: decode a split once, keep it as uint8 tensors at the training size.

Decoding a few thousand images and masks takes minutes on a small machine and is identical for every
run of a sweep, so it is done once per (split, size, file list) and written atomically under a file
lock: parallel sweep jobs build it once, and a build killed half-way leaves only a temp file behind.
Every pair is checked while it is decoded; one message lists every bad file, grouped by problem. The label census
(pixels per class, the ignored ones, the files' raw values and how each mask was read) is counted at the same time
and kept in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from filelock import FileLock
from PIL import Image

from segx.core.errors import ConfigError, DatasetUnavailableError, SegxError
from segx.core.files import atomic_path
from segx.data.masks import MaskDecoder, MaskProblem
from segx.data.source import IGNORE_INDEX, SplitFiles

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the label census is kept beside the tensors


@dataclass
class CachedSplit:
    """One split at one size: `images` uint8 [N,3,S,S], `masks` uint8 [N,S,S] (class indices or the ignore index)."""

    split: str
    image_size: int
    ids: list[str]
    images: torch.Tensor
    masks: torch.Tensor
    original_sizes: torch.Tensor  # int32 [N,2] (height, width) of the source files, for full-res scoring
    census: dict | None = None  # counted in the mask files (see `MaskCensus`): {"labels": [256 pixel counts per
                                #   label value, after mapping], "raw": {file value or colour: pixels}, "readings":
                                #   {how masks were read: count}}

    def __len__(self) -> int:
        return len(self.ids)


def fingerprint(image_files: list[str], mask_files: list[str]) -> str:
    """Names, byte sizes and modification times of every file: any change to the split list or to a
    file gives a new cache (a copied tree without preserved mtimes is decoded once more, never misread)."""
    digest = hashlib.sha1()
    for path in [*image_files, *mask_files]:
        stat = os.stat(path)
        digest.update(f"{os.path.basename(path)}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


LIST_LIMIT = 10  # bad or missing files named in one message; the rest are counted


def name_list(names: list[str], limit: int = LIST_LIMIT) -> str:
    """'a, b, c' for up to `limit` names (sorted), then 'and N more': a 2,913-file problem stays one line."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit} more"


# Problems a decoded pair can have, in the order a message lists them: (key, how the group is described).
PROBLEMS = {
    "image": "image(s) that cannot be decoded (truncated or corrupt {format})",
    "mask": "mask(s) that cannot be decoded (truncated or corrupt {format})",
    "mode": "mask(s) that are not index images (a mask holds one class index per pixel: a palette 'P' or "
            "greyscale 'L' image)",
    "colour": "mask(s) with colours that are not in data.palette",
    "labels": "mask(s) with values outside the classes",
    "size": "mask(s) whose height and width differ from their image's",
}
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
           ".webp": "WebP"}
DEFAULT_FIX = "Replace these files with good copies, or leave them out of the split, and run again."


def _format_of(paths: list[str]) -> str:
    """'JPEG' when every file of a group has that kind of name, else 'file': the words a user recognises."""
    kinds = {FORMATS.get(os.path.splitext(path)[1].lower(), "file") for path in paths}
    return kinds.pop() if len(kinds) == 1 else "file"


@dataclass(frozen=True)
class BadFile:
    """One problem with one file: `problem` is a key of PROBLEMS, `detail` says what was found."""

    problem: str
    path: str
    detail: str = ""
    values: tuple[int, ...] = ()  # a "labels" problem's values outside the classes; a "colour" one's colour codes


def _common_values(bad: list[BadFile], problem: str, total: int | None) -> tuple[list[int], dict[int, int]]:
    """The values of `problem` found in at least half of a split's `total` masks, and how many masks hold each."""
    holders: Counter[int] = Counter(v for b in bad if b.problem == problem for v in b.values)
    return sorted(v for v, n in holders.items() if total and n * 2 >= total), holders


def _label_convention(bad: list[BadFile], total: int | None, ignore_index: int) -> str | None:
    """When values outside the classes (or colours outside the palette) fill at least half of a split's masks, they
    are the dataset's way of marking something (CamVid's void is 11, an export's "unlabelled" grey), not damage: the
    sentence naming the keys that map them, else None."""
    sentences = []
    common, holders = _common_values(bad, "labels", total)
    if common:
        counts = ", ".join(f"{v} in {holders[v]} of {total} masks" for v in common)
        mapping = ", ".join(f"{v}: {ignore_index}" for v in common)
        sentences.append(f"The values {counts} look like a label convention of the dataset rather than bad files: map "
                         f"them with data.label_map={{{mapping}}} (ignored; or onto a class index), or, for one value, "
                         f"make it the ignore index with data.ignore_index={common[0]}.")
    common, holders = _common_values(bad, "colour", total)
    if common:
        names = [f"#{c:06X}" for c in common]
        counts = ", ".join(f"{n} in {holders[c]} of {total} masks" for n, c in zip(names, common, strict=True))
        quoted = ",".join(f"'{n}'" for n in names)
        sentences.append(f"The colour(s) {counts} are a convention of the dataset (an 'unlabelled' colour, a "
                         f"border), not damage: ignore them with "
                         f"data.ignore_colours=[{quoted}], map them onto a class with colour keys of data.label_map "
                         f"in a config file ('{names[0]}': 1), or add them to data.palette as classes of their own.")
    return " ".join(sentences) or None


def describe_bad_files(bad: list[BadFile], split: str, num_classes: int, fix: str,
                       ignore_index: int = IGNORE_INDEX, total: int | None = None) -> str:
    """One paragraph: every problem group with its files (the first LIST_LIMIT by name, then a count), and the
    keys that fix a whole split's convention (values outside the classes in most masks, colour masks) first."""
    groups = []
    for key, what in PROBLEMS.items():
        files = sorted((b for b in bad if b.problem == key), key=lambda b: os.path.basename(b.path))
        if not files:
            continue
        what = what.format(format=_format_of([b.path for b in files]))
        if key == "labels":
            what = f"{what} (0..{num_classes - 1} and {ignore_index} are allowed)"
        folders = {os.path.dirname(b.path) for b in files}
        where = f" in {folders.pop()}" if len(folders) == 1 else ""
        names = [os.path.basename(b.path) if where else b.path for b in files]
        if key in ("image", "mask"):  # the decoder's words once: they vary little and would swamp the list
            listed = f"{name_list(names)} (the first says: {files[0].detail})"
        else:
            listed = name_list([f"{n} ({b.detail})" for n, b in zip(names, files, strict=True)])
        groups.append(f"{len(files)} {what}{where}: {listed}")
    count = len({b.path for b in bad})
    hints = [_label_convention(bad, total, ignore_index)]
    if any(b.problem == "mode" and b.detail.startswith("mode RGB") for b in bad):
        hints.append("Colour masks (one colour per class) are read through data.palette: give it (data.mask_format="
                     "auto, the default, then reads colour images through it), or set data.mask_format=rgb.")
    found = " ".join(h for h in hints if h)
    return (f"The {split} split has {count} bad file(s), so no cache was written: {'; '.join(groups)}. "
            f"{found + ' Otherwise: ' if found else ''}{fix}")


def _pil_error(error: BaseException, path: str) -> str:
    """The decoder's message on one line, the file's full path (already named) cut to its name."""
    return f"{type(error).__name__}: {error}".replace("\n", " ").replace(path, os.path.basename(path))


RESIZES = ("square", "keep_ratio")
#: How images and masks are resampled to the cache's size: `antialias` (bilinear with antialiasing; masks nearest,
#: pixel centres) or `cv2` (the study's `cv2.resize`: bilinear without antialiasing, INTER_NEAREST for masks).
INTERPOLATIONS = ("antialias", "cv2")


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise ConfigError(f"data.resize={resize!r} is not a choice; use square (stretch every image to image_size × "
                          "image_size, the study's) or keep_ratio (the longer side to image_size, the rest padded).")
    return resize


def check_interpolation(interpolation: str) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.interpolation={interpolation!r} is not a choice; use antialias (bilinear with "
                          "antialiasing, segx's default) or cv2 (bilinear without antialiasing and nearest masks, as "
                          "the study's cv2.resize did).")
    return interpolation


def resized_shape(height: int, width: int, size: int, resize: str = "square") -> tuple[int, int]:
    """The (height, width) an image of that size covers in the size × size cache: all of it for `square`; for
    `keep_ratio` its longer side is `size` and the top-left part holds it (the rest is padding)."""
    if resize == "square":
        return size, size
    scale = size / max(height, width)
    return max(1, min(size, round(height * scale))), max(1, min(size, round(width * scale)))


def _resize(tensor: torch.Tensor, size: int, resize: str, mode: TF.InterpolationMode, fill: int,
            antialias: bool) -> torch.Tensor:
    height, width = resized_shape(int(tensor.shape[-2]), int(tensor.shape[-1]), size, resize)
    tensor = TF.resize(tensor, [height, width], interpolation=mode, antialias=antialias)
    if (height, width) != (size, size):
        tensor = TF.pad(tensor, [0, 0, size - width, size - height], fill=fill)  # left, top, right, bottom
    return tensor


def resize_image(image: torch.Tensor, size: int, resize: str = "square",
                 interpolation: str = "antialias") -> torch.Tensor:
    """uint8 [3,H,W] to size × size, bilinear (with antialiasing unless `interpolation=cv2`); `keep_ratio` pads the
    bottom and right black."""
    return _resize(image, size, resize, TF.InterpolationMode.BILINEAR, 0, antialias=interpolation == "antialias")


def resize_pair(
    image: torch.Tensor, mask: torch.Tensor, size: int, resize: str = "square", ignore_index: int = IGNORE_INDEX,
    interpolation: str = "antialias",
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3,H,W] and [1,H,W] to size × size: the image as `resize_image`, the mask nearest (pixel centres, or
    cv2's INTER_NEAREST, which takes the source pixel at floor(x · scale)), `keep_ratio`'s padding `ignore_index`
    (never scored)."""
    nearest = TF.InterpolationMode.NEAREST if interpolation == "cv2" else TF.InterpolationMode.NEAREST_EXACT
    return (resize_image(image, size, resize, interpolation),
            _resize(mask, size, resize, nearest, ignore_index, antialias=False))


def read_image(image_file: str | Path) -> torch.Tensor:
    """One image file, decoded whole (PIL decodes lazily: a truncated file fails here), as uint8 RGB [3,H,W]."""
    with Image.open(image_file) as img:
        img.load()
        return TF.pil_to_tensor(img.convert("RGB"))


@dataclass
class MaskCensus:
    """The label census of some masks, counted in the files at their own size: pixels per label value after
    mapping (class ids and the ignore index), per raw value of the files, and how many masks were read each way."""

    labels: Counter[int] = field(default_factory=Counter)
    raw: Counter[str] = field(default_factory=Counter)
    readings: Counter[str] = field(default_factory=Counter)

    RAW_KEPT = 64  # raw values (or colours) kept in the cache, the most frequent first: anti-aliased masks have many

    def add(self, other: MaskCensus) -> None:
        self.labels.update(other.labels)
        self.raw.update(other.raw)
        self.readings.update(other.readings)

    def as_dict(self) -> dict:
        """What the cache stores: plain ints, lists and str-keyed dicts (loadable with weights_only)."""
        raw = dict(self.raw.most_common(self.RAW_KEPT))
        left = sum(self.raw.values()) - sum(raw.values())
        return {"labels": [int(self.labels.get(v, 0)) for v in range(256)], "raw": raw,
                "raw_other": int(left), "readings": dict(self.readings)}


def check_pair(
    image_file: str, mask_file: str, size: int, num_classes: int, ignore_index: int = IGNORE_INDEX,
    decoder: MaskDecoder | None = None, resize: str = "square", interpolation: str = "antialias",
    census: MaskCensus | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None, list[BadFile]]:
    """Decode and check one pair fully: (image, mask, original size) or None, and every problem found; a good
    mask's counts are added to `census`.

    Images are resized bilinear (see `resize_pair` for `interpolation`), masks with nearest neighbour so labels
    stay labels.
    `read_image` forces the whole image through the decoder: a truncated JPEG is caught now and named, not met
    half-way through a resize.
    """
    bad: list[BadFile] = []
    image = mask = None
    try:
        image = read_image(image_file)
    except Exception as error:  # whatever the decoder raises, this file cannot be used
        bad.append(BadFile("image", image_file, _pil_error(error, image_file)))
    decoder = decoder or MaskDecoder(ignore_index=ignore_index)
    raw: dict[str, int] = {}
    reading = ""
    try:
        with Image.open(mask_file) as msk:
            msk.load()
            labels, raw, reading = decoder.read(msk)
            mask = torch.from_numpy(labels)[None]
    except MaskProblem as problem:
        bad.append(BadFile(problem.problem, mask_file, problem.detail, problem.values))
    except Exception as error:
        bad.append(BadFile("mask", mask_file, _pil_error(error, mask_file)))
    counts = None
    if mask is not None:  # one count per label value serves both the check and the census
        counts = torch.bincount(mask.flatten().long(), minlength=256)
        values = counts.nonzero().flatten()
        wrong = values[(values >= num_classes) & (values != ignore_index)].tolist()
        if wrong:
            shown = ", ".join(map(str, wrong[:5])) + (", ..." if len(wrong) > 5 else "")
            bad.append(BadFile("labels", mask_file, f"values {shown}", tuple(int(v) for v in wrong)))
    if image is not None and mask is not None and image.shape[-2:] != mask.shape[-2:]:
        bad.append(BadFile(
            "size", mask_file,
            f"{mask.shape[-2]}x{mask.shape[-1]}, image {image.shape[-2]}x{image.shape[-1]}",
        ))
    if bad or image is None or mask is None:
        return None, bad
    if census is not None and counts is not None:  # counts: set, as the mask was read
        census.labels.update({v: int(n) for v, n in enumerate(counts.tolist()) if n})
        census.raw.update(raw)
        census.readings[reading] += 1
    original = (int(image.shape[-2]), int(image.shape[-1]))
    image, mask = resize_pair(image, mask, size, resize, ignore_index, interpolation)
    return (image, mask[0], original), bad


def _atomic_save(obj: object, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        torch.save(obj, file)  # through a Python file: a full disk surfaces as OSError ENOSPC, named by atomic_path


def _build(
    split: str, files: SplitFiles, size: int, num_classes: int, ignore_index: int, bad_files_fix: str,
    progress: Callable[[int, int], None] | None, decoder: MaskDecoder | None = None, resize: str = "square",
    interpolation: str = "antialias",
) -> CachedSplit:
    """Decode every pair, checking each; one SegxError at the end lists every bad file, grouped by problem."""
    n = len(files.ids)
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    masks = torch.empty((n, size, size), dtype=torch.uint8)
    original = torch.empty((n, 2), dtype=torch.int32)
    bad: list[BadFile] = []
    census = MaskCensus()

    def check(pair: tuple[str, str]) -> tuple[tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None,
                                              list[BadFile], MaskCensus]:
        own = MaskCensus()  # one per pair: threads never update a shared counter
        return (*check_pair(pair[0], pair[1], size, num_classes, ignore_index, decoder, resize, interpolation, own),
                own)

    # PIL decodes and resizes with the GIL released, so threads use every core without pickling tensors.
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        results = pool.map(check, zip(files.images, files.masks, strict=True))
        for i, (decoded, problems, counted) in enumerate(results):
            census.add(counted)
            bad.extend(problems)
            if decoded is not None:
                images[i], masks[i], original[i] = decoded[0], decoded[1], torch.tensor(decoded[2])
            if progress is not None:
                progress(i + 1, n)
    if bad:
        raise DatasetUnavailableError(describe_bad_files(bad, split, num_classes, bad_files_fix, ignore_index, n))
    return CachedSplit(split, size, list(files.ids), images, masks, original, census.as_dict())


def _cache_problem(blob: object, ids: list[str], size: int) -> str | None:
    """Why a loaded cache cannot be used (another version, missing keys, wrong shapes), or None."""
    if not isinstance(blob, dict):
        return f"it holds a {type(blob).__name__}, not a cache"
    if blob.get("format") != CACHE_FORMAT:
        return f"format {blob.get('format')!r}, this version writes {CACHE_FORMAT}"
    missing = [key for key in ("ids", "images", "masks", "original_sizes", "census") if key not in blob]
    if missing:
        return f"keys {', '.join(missing)} are missing"
    if blob["ids"] != list(ids):
        return "its ids differ from the split's"
    n = len(ids)
    expected = {
        "images": ((n, 3, size, size), torch.uint8), "masks": ((n, size, size), torch.uint8),
        "original_sizes": ((n, 2), torch.int32),
    }
    for key, (shape, dtype) in expected.items():
        value = blob[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
            found = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
            return f"{key} is {found}, expected {shape} {dtype}"
    return None


def _make_writable(cache_dir: Path) -> None:
    """The cache folder, created if needed; a read-only one (a shared dataset's data.root) says how to move it."""
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        reason = None if os.access(cache_dir, os.W_OK) else "permission denied or a read-only filesystem"
    except OSError as error:
        reason = error.strerror or str(error)
    if reason is not None:
        raise SegxError(
            f"The data cache cannot be written to {cache_dir} ({reason}). segx keeps its cache beside the data by "
            "default; for a data.root you cannot write to, set data.cache_dir to a writable folder (for example "
            "data.cache_dir=~/.cache/segx)."
        )


def load_or_build(
    cache_dir: Path, split: str, files: SplitFiles, size: int, num_classes: int,
    ignore_index: int = IGNORE_INDEX, bad_files_fix: str = DEFAULT_FIX, decoder: MaskDecoder | None = None,
    resize: str = "square", interpolation: str = "antialias",
) -> CachedSplit:
    """Return the cached split, building it first if no cache matches this file list and size.

    A cache that is truncated, from another format or inconsistent with the ids is rebuilt, never used.
    Building checks every file (see `check_pair`) and writes nothing when any is bad; the SegxError that
    lists them ends with `bad_files_fix`, the source's words for replacing them.
    """
    ids = files.ids
    _make_writable(cache_dir)
    decoding = f"-{decoder.key}" if decoder is not None and decoder.key else ""  # masks read another way: apart
    kept = "-keep_ratio" if check_resize(resize) == "keep_ratio" else ""
    resampled = "-cv2" if check_interpolation(interpolation) == "cv2" else ""  # other pixels: a cache of their own
    path = cache_dir / f"{split}-{size}px{kept}{resampled}-{fingerprint(files.images, files.masks)}{decoding}.pt"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            try:
                # Mapped, not read: jobs on one node share the file's pages, and a batch touches only its own.
                blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as error:  # an unreadable cache is rebuilt, never trusted
                problem: str | None = f"unreadable: {error}".replace("\n", " ")
            else:
                problem = _cache_problem(blob, ids, size)
                if problem is None:
                    return CachedSplit(split, size, blob["ids"], blob["images"], blob["masks"], blob["original_sizes"],
                                       blob["census"])
            log.warning("Cache %s cannot be used (%s); rebuilding it.", path, problem)
        start = last_report = time.perf_counter()

        def progress(done: int, total: int) -> None:
            nonlocal last_report
            now = time.perf_counter()
            if done == total or now - last_report > 5:
                last_report = now
                log.info("Caching %s split at %dpx: %d/%d images (%.0fs)", split, size, done, total, now - start)

        log.info("Building the %s cache at %dpx from %d images into %s", split, size, len(ids), path)
        cached = _build(split, files, size, num_classes, ignore_index, bad_files_fix, progress, decoder, resize,
                        interpolation)
        blob = {
            "format": CACHE_FORMAT, "ids": cached.ids, "images": cached.images, "masks": cached.masks,
            "original_sizes": cached.original_sizes, "census": cached.census,
        }
        _atomic_save(blob, path)
        log.info("Cached %d %s images in %.1fs", len(ids), split, time.perf_counter() - start)
        return cached
