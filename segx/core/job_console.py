"""What a sweep job running in a process of its own (Ray, submitit) shows on its console, which Ray forwards to the
sweep's: its start line, one line per epoch, a resume or skip line, and warnings (the sweep prints its end line).
The rest (the config tree, Lightning's layer table and device lines) still goes to the job's train.log."""

from __future__ import annotations

import logging

#: `extra=` of a log record that a sweep job shows on the console.
ON_CONSOLE = {"on_console": True}


class JobConsoleFilter(logging.Filter):
    """Passes warnings and the records logged with `extra=ON_CONSOLE`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or bool(getattr(record, "on_console", False))


def _console_handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *(logger for logger in logging.root.manager.loggerDict.values()
                                      if isinstance(logger, logging.Logger))]
    # Lightning gives its loggers a handler of their own when it is imported before logging is set up.
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


def quiet_job_console() -> None:
    """Filter every console handler of this process as `JobConsoleFilter` does; file handlers keep everything."""
    for handler in _console_handlers():
        if not any(isinstance(f, JobConsoleFilter) for f in handler.filters):
            handler.addFilter(JobConsoleFilter())
