"""How a run ended: the statuses `metrics.json` records, and what interrupted a run."""

from __future__ import annotations

from pytorch_lightning.utilities.exceptions import SIGTERMException

RUNNING, COMPLETED, FAILED = "running", "completed", "failed"


def interruption(error: BaseException) -> str | None:
    """What interrupted a run, or None for an ordinary error (Lightning turns Ctrl-C into `sys.exit(1)`)."""
    if isinstance(error, SIGTERMException):
        return "SIGTERM"
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return "Ctrl-C"
    return None
