"""Small files a run leaves behind, written so that a crash never leaves half of one."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segx.core.errors import SegxError, find_in_chain

#: The errors of a write that a full filesystem (or a full quota) causes.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(SegxError):
    """A file could not be written because its filesystem (or quota) is full; the previous file is kept."""

    def __init__(self, message: str, errno_: int = errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = errno_


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _disk_full_cause(error: BaseException) -> OSError | None:
    """The out-of-space OSError behind `error` (torch.save, say, reports it as a RuntimeError in its context)."""
    found = find_in_chain(error, lambda e: isinstance(e, OSError) and e.errno in DISK_FULL)
    return found if isinstance(found, OSError) else None


def disk_full_error(path: str | Path, error: OSError) -> DiskFullError:
    """One paragraph for a write that ran out of space: the file, its filesystem, what is free there."""
    path = Path(path)
    folder = next((p for p in path.parents if p.exists()), Path("/"))
    mount = _mount_point(folder)
    try:
        usage = shutil.disk_usage(folder)
        space = f"{_size(usage.free)} free of {_size(usage.total)}"
    except OSError:
        space = "free space unknown"
    kept = "the previous version is kept" if path.exists() else "nothing was left in its place"
    return DiskFullError(
        f"Could not write {path}: {os.strerror(error.errno)} on the filesystem mounted at {mount} "
        f"({space}); {kept}. Free space there, or write the run elsewhere (hydra.run.dir=... or "
        "hydra.sweep.dir=... on a larger disk).", error.errno)



def _finite(value: Any) -> Any:
    """JSON has no NaN/inf; an undefined score is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `path` to write to; renamed onto `path` only when the block succeeds, so a
    crash or Ctrl-C never leaves half a file (and a failed block leaves no temp file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from everyone else
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = _disk_full_cause(error)
        if cause is not None and not isinstance(error, DiskFullError):
            raise disk_full_error(path, cause) from error
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, payload: dict[str, Any], on_full_disk_in_place: bool = False) -> None:
    """Write `payload` as indented JSON via a temp file and a rename. With `on_full_disk_in_place`, a full disk
    rewrites the file where it is instead, provided the new text fits in the blocks the old one holds (the last
    word of a run that failed for want of space: its status)."""
    text = json.dumps(_finite(payload), indent=2, sort_keys=False) + "\n"
    try:
        write_text_atomic(path, text)
    except DiskFullError:
        encoded = text.encode("utf-8")
        if not on_full_disk_in_place or not Path(path).is_file() or len(encoded) > os.stat(path).st_blocks * 512:
            raise
        with open(path, "r+b") as file:  # overwrite, then cut: the blocks already allocated are reused
            file.write(encoded)
            file.truncate()
