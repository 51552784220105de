"""One trial of a search, run by Ray Tune in a worker: the sweep's config with the trial's values, run as an ordinary
sweep job in `<sweep dir>/<N>/` that reports each epoch's score to Tune."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, open_dict

from segx.search.searchers import JOB_KEY
from segx.search.space import SearchSpace

RUN_END_S = 300.0  # the longest a paused or stopped trial's actor waits for its run to end before it exits


def trial_overrides(config: dict[str, Any], space: SearchSpace) -> list[str]:
    """The overrides of the trial Tune hands this `config`: the shared settings, then the trial's values."""
    return space.trial_overrides({key: str(value) for key, value in config.items() if key != JOB_KEY})


def run_trial(config: dict[str, Any], *, hydra_context: Any, master_config: DictConfig, task_function: Any,
              singleton_state: Any, space: SearchSpace, monitor: str) -> None:
    """Compose the trial's job config as Hydra's launchers do and run it with the tune report callback added."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.singleton import Singleton
    from hydra.core.utils import run_job, setup_globals

    job = int(config[JOB_KEY])
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = hydra_context.config_loader.load_sweep_config(master_config, trial_overrides(config, space))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"trial_{job}"
        sweep_config.hydra.job.num = job
        if sweep_config.get("callbacks") is None:
            sweep_config.callbacks = {}
        # Added here, not as an override: it is how the trial talks to Tune, not a setting the run records.
        sweep_config.callbacks.tune_report = {"_target_": "segx.training.callbacks.TuneReport", "monitor": monitor}
    HydraConfig.instance().set_config(sweep_config)
    done = run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    # the run's own folder (Hydra's working_dir is where the process runs, the launch folder without chdir)
    _report_last_epoch(Path(str(done.hydra_cfg.hydra.runtime.output_dir)), monitor)


def _report_last_epoch(run_dir: Path, monitor: str) -> None:
    """The finished run's last epoch, which TuneReport leaves to this point: a stop now costs nothing."""
    from segx.runs.record import read_record
    from segx.runs.status import COMPLETED, StopRequested
    from segx.training.callbacks.tune_report import report_to_tune

    record = read_record(run_dir) or {}
    history = record.get("history") or []
    score = history[-1].get(monitor) if history else None
    if record.get("status") != COMPLETED or score is None or not math.isfinite(score):
        return  # a failed run reports nothing: Tune keeps its earlier results
    try:
        report_to_tune(int(history[-1]["epoch"]) + 1, float(score))
    except StopRequested:
        pass


def end_the_run_first() -> None:
    """Before a trial's actor exits (Tune pauses or stops a trial by ending its actor): tell the run to stop and
    wait for it to end, its teardown and its record included. Tune itself waits for none of it, while the run,
    reporting asynchronously, is already training its next epoch; a process that exits under it can abort
    ("Fatal Python error") or leave a half-written file."""
    import time

    from ray.train._internal.session import get_session

    session = get_session()
    if session is None or not session.training_started:
        return
    deadline = time.monotonic() + RUN_END_S
    while session.training_thread.is_alive() and time.monotonic() < deadline:
        # Each report waits on the lock and then exits the thread when asked to stop, the wrapper's own last
        # report (after the run returned) included: keep both set until the thread is gone.
        session.stop_event.set()
        session.continue_lock.release()
        session.training_thread.join(timeout=0.2)
