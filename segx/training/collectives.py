"""A DDP run whose ranks stopped answering one another: the collective timeout's error told as one paragraph."""

from __future__ import annotations

import os
import re
import traceback

from segx.core.errors import SegxError, exception_chain, find_in_chain

# What a collective past its timeout raises: gloo's RuntimeError, NCCL's watchdog (a DistBackendError).
TIMEOUT_MARKERS = ("Timed out waiting", "Watchdog caught collective operation timeout",
                   "collective operation timeout")
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')
_SPAWNED_RANK = re.compile(r"Process (\d+) terminated with the following error")


class CollectiveTimeoutError(SegxError):
    """A rank waited past `distributed.collective_timeout_s` in a collective: another rank stopped answering."""


def is_collective_timeout(error: BaseException) -> bool:
    """Whether `error` (or one in its chain) is a collective that timed out, raised in this process or, under
    ddp_spawn, reported as a spawned rank's traceback."""
    return find_in_chain(error, lambda e: any(marker in str(e) for marker in TIMEOUT_MARKERS)) is not None


def _frames(error: BaseException) -> list[tuple[str, int, str]]:
    """(file, line, function) of every frame in `error`'s chain, outermost first; a spawned rank's traceback comes
    as text in the message."""
    frames: list[tuple[str, int, str]] = []
    for current in exception_chain(error):
        frames += [(f.filename, f.lineno or 0, f.name) for f in traceback.extract_tb(current.__traceback__)]
        frames += [(file, int(line), name) for file, line, name in _FRAME.findall(str(current))]
    return frames


def where_it_waited(error: BaseException) -> str | None:
    """The hook the rank was in when its collective timed out ('on_train_epoch_end (segx/training/module.py:175)'):
    the innermost Lightning hook or step of the traceback."""
    hooks = [frame for frame in _frames(error) if frame[2].startswith("on_") or frame[2].endswith("_step")]
    if not hooks:
        return None
    file, line, name = hooks[-1]
    parts = file.replace(os.sep, "/").split("/")
    short = "/".join(parts[parts.index("segx"):]) if "segx" in parts else "/".join(parts[-2:])
    return f"{name} ({short}:{line})"


def collective_timeout_message(error: BaseException, rank: int, seconds: float | None) -> str:
    """One paragraph: which rank waited, where, for how long, what it means and what to do."""
    spawned = _SPAWNED_RANK.search(str(error))
    rank = int(spawned.group(1)) if spawned else rank
    where = where_it_waited(error)
    limit = f"{seconds:g} s" if seconds else "its timeout"
    return (f"Rank {rank} of this DDP run waited {limit} in a collective (an all_reduce, all_gather or barrier "
            f"that every rank must enter){f' in {where}' if where else ''}, and another rank never answered: it hung, "
            "died, or took another path through the hooks. The run was stopped and its record marked failed. Look "
            "in train.log for an error from another rank; a rank that is only slow (a long checkpoint write, a slow "
            "disk) needs a larger distributed.collective_timeout_s. PyTorch's words: "
            f"{str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__}")


__all__ = ["CollectiveTimeoutError", "collective_timeout_message", "is_collective_timeout", "where_it_waited"]
