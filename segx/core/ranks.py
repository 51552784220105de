"""Which process of a multi-process (DDP) run this is: only global rank 0 writes run files or downloads."""

from __future__ import annotations

import os
import sys

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
