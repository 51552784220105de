"""Which process of a multi-process (DDP) run this is (only global rank 0 writes run files or downloads), and ranks
that end with the process that started them."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys

log = logging.getLogger(__name__)

_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank: Lightning's once it has set it, else the launcher's environment, else 0."""
    lightning = sys.modules.get("lightning_fabric.utilities.rank_zero")  # not imported: it has set no rank
    rank = getattr(getattr(lightning, "rank_zero_only", None), "rank", None)
    if rank is not None:
        return int(rank)
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def is_rank_zero() -> bool:
    """False in the extra processes of a multi-process (DDP) run, which must not write run files."""
    return global_rank() == 0


def end_with_parent(parent: int | None = None) -> None:
    """Have the kernel kill this process when the process that started it (`parent`, if known) exits, whatever ends
    that one (SIGTERM, SIGINT, SIGKILL): a spawned DDP rank must not outlive its job. Linux only."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1  # noqa: N806  # prctl(2)'s constant
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request was in place, so it will never fire
        os._exit(1)


def end_with_the_job_if_a_rank() -> None:
    """`end_with_parent` as early as a process can: in ranks `ddp` started by running the command line again
    (Lightning gives them LOCAL_RANK 1..n) and in processes `multiprocessing` spawned (ddp_spawn's ranks, which
    import the main module again); before a rank's imports, so a job killed while its ranks start leaves none."""
    if os.environ.get("LOCAL_RANK", "0") not in ("", "0") or multiprocessing.parent_process() is not None:
        end_with_parent()
