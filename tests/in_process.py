"""Run train.py / evaluate.py inside the test process: the same Hydra main a user's command runs, without the
seconds a new interpreter spends importing torch and Lightning. For tests where the subprocess is not the point;
whatever a run changes in the process (logging, warnings, signals, torch and RNG settings, the environment) is put
back afterwards, so the next test sees the process as it was."""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import logging
import os
import random
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


QUIET_LIBRARIES = {"sqlalchemy", "alembic"}  # MLflow's store: INFO would log every SQL statement
SCRIPTS = {"train.py": "segx.cli.train", "evaluate.py": "segx.cli.evaluate"}  # the checkout's scripts call these


def _main(script: str) -> Callable[[], object]:
    """The Hydra main of `train.py`, `evaluate.py` or an entry-point module such as `segx.cli.predict`."""
    return importlib.import_module(SCRIPTS.get(script, script)).main


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    """Hydra's job logging replaces the root logger's handlers and configures named loggers: undo all of it."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    saved = {id(lg): (lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled, list(lg.filters))
             for lg in loggers}
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for lg in list(logging.Logger.manager.loggerDict.values()) + [logging.getLogger()]:
            if not isinstance(lg, logging.Logger):
                continue
            before = saved.get(id(lg))
            kept = before[2] if before else []
            for handler in lg.handlers:
                if handler not in kept:
                    handler.close()  # the run's train.log
            if before:
                _, lg.level, lg.handlers[:], lg.propagate, lg.disabled, lg.filters[:] = before
            elif lg.name.split(".")[0] in QUIET_LIBRARIES:  # set to WARNING at their import, which is not repeated
                lg.handlers.clear()
            else:
                lg.handlers.clear()
                lg.setLevel(logging.NOTSET)
                lg.propagate, lg.disabled = True, False
                lg.filters.clear()


def _mlflow_tracking_uri() -> str | None:
    """MLflow's process-wide tracking URI (None: the environment's or the default)."""
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    return getattr(tracking, "_tracking_uri", None)


@contextlib.contextmanager
def _process_state_restored() -> Iterator[None]:
    environ = dict(os.environ)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    matmul = torch.get_float32_matmul_precision()
    dtype = torch.get_default_dtype()
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    argv, cwd = list(sys.argv), os.getcwd()
    mlflow_uri = _mlflow_tracking_uri()
    try:
        with warnings.catch_warnings(), _logging_restored():
            yield
    finally:
        tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if tracking is not None and hasattr(tracking, "_tracking_uri"):  # Lightning's MLflow logger sets it
            tracking._tracking_uri = mlflow_uri
        os.environ.clear()
        os.environ.update(environ)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(matmul)
        torch.set_default_dtype(dtype)
        torch.set_flush_denormal(False)  # the process's default; run.flush_denormal turns it on
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        sys.argv[:] = argv
        os.chdir(cwd)
        gc.collect()


def run_in_process(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python <script> <overrides>` (or `python -m <module> ...`) run by its Hydra main in this process: its exit
    code, stdout and stderr."""
    from hydra.core.global_hydra import GlobalHydra

    main = _main(script)
    stdout, stderr = io.StringIO(), io.StringIO()
    code: int = 0
    with _process_state_restored():
        os.environ.update({"PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"})
        sys.argv[:] = [str(ROOT / script) if script in SCRIPTS else script, *overrides]
        GlobalHydra.instance().clear()
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                main()
        except SystemExit as exit_:  # Hydra's and segx's exits: the code a shell would see
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        finally:
            GlobalHydra.instance().clear()
    result = subprocess.CompletedProcess([script, *overrides], code, stdout.getvalue(), stderr.getvalue())
    if check and code != 0:
        raise AssertionError(f"{script} failed ({code}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result
