"""How a run ended: the statuses `metrics.json` records, and telling Ctrl-C, SIGTERM, a scheduler's stop and a
plain `sys.exit()` apart."""

from __future__ import annotations

import sys

RUNNING, COMPLETED, FAILED, STOPPED = "running", "completed", "failed", "stopped"
#: A sweep job whose worker was lost (its node died, say) and that waits for its launcher's next attempt.
RETRYING = "retrying"
#: Endings a re-run of the same sweep leaves as they are (a stopped job's verdict is the scheduler's).
FINAL = (COMPLETED, STOPPED)
#: A job that has not ended yet: training, or waiting to train again.
ACTIVE = (RUNNING, RETRYING)
STATUSES = (RUNNING, RETRYING, COMPLETED, FAILED, STOPPED)

CTRL_C, SIGTERM = "Ctrl-C", "SIGTERM"
#: The shell's exit codes for the two signals (Lightning's own exit after SIGTERM would be 0, after Ctrl-C 1).
EXIT_CODES = {CTRL_C: 130, SIGTERM: 143}


class StopRequested(BaseException):
    """A search scheduler ended the run early (e.g. ASHA dropped a weak trial): recorded as `stopped` with the
    epoch reached, not as a failure. A BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, epoch: int, by: str = "the search scheduler", recorded_elsewhere: bool = False) -> None:
        super().__init__(epoch, by)
        self.epoch = int(epoch)
        self.by = by
        # Ray Tune ends a trial the same way whether its scheduler dropped it or the search was interrupted: only the
        # search's driver knows which, and records it; the run then leaves its record as it stands.
        self.recorded_elsewhere = recorded_elsewhere

    def __str__(self) -> str:
        return f"stopped by {self.by} at epoch {self.epoch}"


def interruption(error: BaseException) -> str | None:
    """`Ctrl-C` or `SIGTERM` when a signal interrupted the run (it can resume from `last.ckpt`), else None: an
    ordinary error, a scheduler's stop, or a `sys.exit()` of the code itself."""
    lightning = sys.modules.get("pytorch_lightning.utilities.exceptions")  # not imported: not raised either
    if lightning is not None and isinstance(error, lightning.SIGTERMException):  # Lightning's SIGTERM handler
        return SIGTERM
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C outside `trainer.fit`, and what Lightning's callbacks see
        return CTRL_C
    if isinstance(error, SystemExit) and error.code == 1 and isinstance(error.__context__, KeyboardInterrupt):
        return CTRL_C  # `trainer.fit` turns Ctrl-C into `sys.exit(1)` raised while handling the KeyboardInterrupt
    return None


def describe_exit(error: SystemExit) -> str:
    """One line on a `sys.exit()` that ended a run before it finished, with its code."""
    code = error.code
    if code is None or isinstance(code, int):
        return f"exited with code {code or 0} (sys.exit) before the run finished, not by a signal"
    return f"exited (sys.exit) before the run finished: {code}"
