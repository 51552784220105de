"""One live process per run directory: an exclusive lock on `<run dir>/.segx-owner`, released by the kernel when
its process ends (a killed run never leaves it stuck), naming its owner for whoever is refused."""

from __future__ import annotations

import fcntl
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path

from segx.core.errors import SegxError

OWNER_FILE = ".segx-owner"

_held: dict[Path, int] = {}  # run directory (resolved) -> the open, locked owner file of this process


class RunDirTakenError(SegxError):
    """Another live process owns the run directory."""


def _describe_owner(fd: int, run_dir: Path) -> str:
    try:
        owner = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        owner = {}
    if not owner:
        return "another process"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {owner.get('since', '?')})"


def claim_run_dir(run_dir: str | Path, what: str = "hydra.run.dir") -> None:
    """Lock `run_dir` for this process (a no-op when it holds it already); RunDirTakenError when another live
    process holds it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / OWNER_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = _describe_owner(fd, run_dir)
        os.close(fd)
        raise RunDirTakenError(
            f"{what}={run_dir} is in use by another run: {owner}, recorded in {run_dir / OWNER_FILE}. Two runs in "
            "one directory would mix their checkpoints, logs and metrics.json. Wait for that run to end (or stop "
            f"it), or give this one another {what}."
        ) from None
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}).encode(), 0)
    _held[run_dir] = fd


def release_run_dir(run_dir: str | Path) -> None:
    """Give up this process's lock on `run_dir` (nothing happens when it holds none)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def gone_owner(run_dir: str | Path) -> str | None:
    """'pid N on this host' when the run directory's last owner ran on this machine and has ended (a run still
    recorded as running was killed, or its sweep's driver was); None when it lives, or runs elsewhere."""
    try:
        owner = json.loads((Path(run_dir) / OWNER_FILE).read_text() or "{}")
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if owner.get("host") != socket.gethostname():
        return None  # another machine's process: this one cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} on this host"
    except PermissionError:  # alive, another user's
        return None
    return None
