"""`hydra/sweeper=tune`: the sweep's overrides as a search space, run as one Ray Tune experiment.

Grids, random search and Optuna's TPE pick the trials; successive halving (grids), ASHA or Hyperband stop the weak
ones after validated epochs. Every trial is an ordinary segx run directory `<sweep dir>/<N>/`; a trial the scheduler
stopped gets `status: stopped`. Tune's own state lives in `<sweep dir>/.tune/`, so the same command into the same
`hydra.sweep.dir` resumes the experiment.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from segx.core.errors import ConfigError

log = logging.getLogger(__name__)

GRID_ORDERS = ("auto", "shuffled", "grid")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = {"auto": None, "sha": "successive halving", "asha": "ASHA", "hyperband": "Hyperband", "none": None}
HALVING_STATE = "segx-halving.json"  # successive halving's rungs, beside Tune's experiment state
EXPERIMENT_DIR = ".tune"  # Tune's experiment state, inside the sweep directory
CONFIRM_DIR = ".tune-confirm"  # that of the second stage: the best configurations again, with every seed
OPTUNA_JOURNAL = "optuna.journal"


class TuneSweeper(Sweeper):
    """Runs a multirun's trials with Ray Tune instead of a Hydra launcher (see conf/hydra/sweeper/tune.yaml)."""

    def __init__(self, search: str = "grid", num_samples: int = 1, seed: int = 0, scheduler: str = "auto",
                 grace_period: int = 2, reduction_factor: float = 3, max_t: int | None = None,
                 rungs: Any = None,
                 max_concurrent_trials: int | None = None, check_resources: bool = True, check_nodes: bool = True,
                 confirm_top_k: int = 0, confirm_seeds: Any = (1, 2, 3), grid_order: str = "auto",
                 params: dict | None = None, ray: Any = None) -> None:
        super().__init__()
        self.search, self.num_samples, self.seed = search, int(num_samples), int(seed)
        self.scheduler_name, self.grace_period, self.reduction_factor = scheduler, int(grace_period), reduction_factor
        self.max_t, self.max_concurrent_trials, self.check_resources = max_t, max_concurrent_trials, check_resources
        self.rungs = [int(r) for r in rungs] if rungs else None
        self.confirm_top_k, self.confirm_seeds = int(confirm_top_k), [int(seed) for seed in confirm_seeds]
        self.grid_order, self.check_nodes = str(grid_order), bool(check_nodes)
        self.params = dict(params or {})
        self.ray_cfg = ray
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.task_function, self.config = hydra_context, task_function, config

    def check(self) -> None:
        """The settings of this sweeper that need no Ray to be judged."""
        if self.search not in SEARCHES:
            raise ConfigError(f"hydra.sweeper.search={self.search} is not a search segx knows; use one of "
                              f"{', '.join(SEARCHES)}.")
        if self.scheduler_name not in SCHEDULERS:
            raise ConfigError(f"hydra.sweeper.scheduler={self.scheduler_name} is not a scheduler segx knows; use "
                              f"one of {', '.join(SCHEDULERS)}.")
        if self.scheduler_name == "auto":  # a finite grid is halved in step; an open-ended search is judged as it goes
            self.scheduler_name = "sha" if self.search == "grid" else "asha"
        if self.reduction_factor <= 1:
            raise ConfigError(f"hydra.sweeper.reduction_factor={self.reduction_factor}: give more than 1 (3 keeps the "
                              "best third at each rung).")
        if self.num_samples < 1:
            raise ConfigError(f"hydra.sweeper.num_samples={self.num_samples}: give 1 or more trials.")
        if self.grid_order not in GRID_ORDERS:
            raise ConfigError(f"hydra.sweeper.grid_order={self.grid_order} is not an order segx knows; use one of "
                              f"{', '.join(GRID_ORDERS)}.")
        if self.confirm_top_k < 0 or (self.confirm_top_k and not self.confirm_seeds):
            raise ConfigError(f"hydra.sweeper.confirm_top_k={self.confirm_top_k} needs 0 (no confirmation) or more, "
                              "and then at least one seed in hydra.sweeper.confirm_seeds.")
        assert self.config is not None
        strategy = str(self.config.trainer.get("strategy") or "")
        if "ddp" in strategy:
            raise ConfigError(
                f"trainer.strategy={strategy} cannot run inside a tune trial: Tune runs each trial in a thread of a "
                "Ray worker, where Lightning cannot start its ranks. Search with one device per trial (drop "
                "trainer=ddp), or run a DDP grid with hydra/launcher=gpus and hydra.launcher.ray.remote.num_gpus=2.")

    def sweep(self, arguments: list[str]) -> Any:
        """The whole search; a user's mistake is one paragraph and exit 2, as a single run's would be."""
        try:
            self.check()
            _require_tune(self.search)
            return self._sweep(arguments)
        except ConfigError as error:
            log.error("%s", error)
            raise SystemExit(2) from None

    def _sweep(self, arguments: list[str]) -> Any:
        import ray

        from hydra_plugins.segx_gpus_launcher.gpus_launcher import join_cluster, show_every_log_line, skip_ray_metrics
        from segx.search.space import parse_space

        assert self.config is not None and self.hydra_context is not None
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()  # Tune needs an absolute storage path
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        space = parse_space([*(f"{k}={v}" for k, v in self.params.items()), *arguments],
                            self.hydra_context.config_loader)
        trials = self._trial_count(space)
        max_t = int(self.max_t or self.config.trainer.max_epochs)
        if self.scheduler_name != "none" and self.grace_period < 1:
            raise ConfigError(f"hydra.sweeper.grace_period={self.grace_period}: give 1 or more epochs.")
        if self.scheduler_name != "none" and self.grace_period > max_t:  # a short run: every trial trains to the end
            log.info("hydra.sweeper.grace_period=%d is more than max_t=%d epochs: the first rung is at epoch %d",
                     self.grace_period, max_t, max_t)
            self.grace_period = max_t
        if self.rungs is not None and (self.rungs != sorted(set(self.rungs)) or not 1 <= self.rungs[0] or
                                       self.rungs[-1] >= max_t):
            raise ConfigError(f"hydra.sweeper.rungs={self.rungs}: list rising epochs from 1 to below max_t={max_t} "
                              "(hydra.sweeper.max_t, by default trainer.max_epochs), or null for grace_period × "
                              "reduction_factor^k.")
        # Trials run in Tune's working folder unless told not to (relative paths would break); Tune's own
        # TensorBoard files would show up as extra runs beside each trial's.
        os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
        os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        # A trial that failed before its first validated epoch ends without a score; Tune's strict check would then
        # abort the whole experiment instead of recording one failed trial.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # A trial's own errors are caught and recorded by its job; what reaches Tune is a lost worker, which the
        # search names in one line (segx.search.outcomes) while Tune's traceback stays in the trial's error file.
        os.environ["TUNE_PRINT_ALL_TRIAL_ERRORS"] = "0"
        if self.scheduler_name == "sha":
            # Tune keeps one trial pending for a searcher of its own kind; a resumed search's trials that wait at a
            # rung come back pending, so the grid's later trials would never be created to fill that rung.
            os.environ["TUNE_MAX_PENDING_TRIALS_PG"] = str(max(trials, 1))
        show_every_log_line()
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True)
        remote = OmegaConf.to_container(self.ray_cfg.remote, resolve=True)
        own_ray = not ray.is_initialized()
        skip_ray_metrics(init)
        join_cluster(init, "hydra.sweeper", sweep_dir, self.config, self.check_nodes)
        try:
            return self._run(space, trials, max_t, remote, sweep_dir)
        finally:
            if own_ray:  # now, not at interpreter exit: no Ray process outlives the sweep
                ray.shutdown()

    def _trial_count(self, space: Any) -> int:
        if self.search == "grid":
            return max(1, len(space.grid_points())) * self.num_samples
        return self.num_samples

    def _run(self, space: Any, trials: int, max_t: int, remote: dict, sweep_dir: Path) -> Any:
        from ray import tune
        from ray.tune.trainable.function_trainable import wrap_function

        from hydra_plugins.segx_gpus_launcher.gpus_launcher import alive_nodes, fit_to_cluster
        from segx.runs.record import finalize_stopped
        from segx.search.outcomes import REPORTS_FILE, TrialOutcomes
        from segx.search.plan import SearchPlan, space_kinds, write_plan
        from segx.search.trial import end_the_run_first, run_trial

        assert self.config is not None
        if self.check_resources:
            try:
                remote, note = fit_to_cluster(remote, alive_nodes(), trials, prefix="hydra.sweeper")
            except ConfigError as error:
                log.error("%s", error)
                raise SystemExit(2) from None
            if note:
                log.warning("%s", note.replace("job(s)", "trial(s)"))
        monitor = str(self.config.get("monitor") or "val/miou")
        stopped_by = SCHEDULERS[self.scheduler_name] or "the search scheduler"
        function = wrap_function(tune.with_parameters(
            run_trial, hydra_context=self.hydra_context, master_config=self.config, task_function=self.task_function,
            singleton_state=Singleton.get_state(), space=space, monitor=monitor))

        class Trial(function):  # type: ignore[misc, valid-type]
            def __repr__(self) -> str:  # Ray prefixes an actor's output with it: "(job 3 pid=...)", as the gpus
                return f"job {self.config.get('_job', '?')}"  # launcher's jobs, instead of "(run_trial pid=...)"

            def cleanup(self) -> None:  # a pause or a stop: the run ends before its process does
                end_the_run_first()
                super().cleanup()

        trainable = tune.with_resources(
            Trial, {"cpu": float(remote.get("num_cpus") or 0), "gpu": float(remote.get("num_gpus") or 0)})
        log.info("Searching %d trial(s) (%s search, scheduler %s, max_t %d epochs, %s GPU(s) each) into %s",
                 trials, self.search, self.scheduler_name, max_t, remote.get("num_gpus", 0), sweep_dir)
        plan = SearchPlan(search=self.search, scheduler=self.scheduler_name, trials=trials, max_t=max_t,
                          grace_period=self.grace_period, reduction_factor=self.reduction_factor,
                          parameters=space_kinds(space), listed_rungs=self.rungs)
        write_plan(sweep_dir, plan)  # what the report reads to tell this search from a grid sweep

        def stage(name: str, searcher: Any, scheduler: Any, count: int) -> Any:
            """One Tune experiment in <sweep dir>/<name>, resumed where a run of the same command left it."""
            experiment = sweep_dir / name
            if tune.Tuner.can_restore(str(experiment)):
                log.info("Resuming %s: finished and stopped trials are kept", experiment)
                tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=True)
            else:
                tuner = tune.Tuner(
                    trainable,
                    # successive halving limits the trials training at once itself: Tune's limit counts paused ones
                    tune_config=tune.TuneConfig(
                        metric="score", mode="max", search_alg=searcher(), scheduler=scheduler, num_samples=count,
                        max_concurrent_trials=None if self.scheduler_name == "sha" else self.max_concurrent_trials),
                    run_config=tune.RunConfig(
                        name=name, storage_path=str(sweep_dir), verbose=1,
                        callbacks=[*_json_logger(), TrialOutcomes(sweep_dir, space, stopped_by,
                                                                  experiment / REPORTS_FILE)],
                        failure_config=tune.FailureConfig(max_failures=int(remote.get("max_retries", 3) or 0)),
                    ),
                )
            results = tuner.fit()
            finalize_stopped(sweep_dir)  # each stopped trial's own metrics.json says so, not only a file beside it
            _record_interrupted(results, sweep_dir, space)
            return results

        scheduler = self._scheduler(max_t, plan.rungs, trials, sweep_dir / EXPERIMENT_DIR / HALVING_STATE)
        results = stage(EXPERIMENT_DIR, lambda: self._searcher(space, trials, sweep_dir), scheduler, trials)
        if self.confirm_top_k:
            from segx.search.searchers import GridSearcher

            points = self._confirmation_points(results, sweep_dir)
            log.info("Confirming the best %d configuration(s) with seeds %s at full length: %d trial(s)",
                     len(points) // len(self.confirm_seeds), self.confirm_seeds, len(points))
            confirm = GridSearcher(space, 1, self.seed, metric="score", mode="max", points=points, first_job=trials)
            plan.confirm_jobs, plan.confirm_seeds = list(range(trials, trials + len(points))), self.confirm_seeds
            write_plan(sweep_dir, plan)
            results = stage(CONFIRM_DIR, lambda: confirm, None, len(points))
        log.info("%s", best_trial_line(sweep_dir, monitor))
        return results

    def _confirmation_points(self, results: Any, sweep_dir: Path) -> list[dict[str, str]]:
        """The `confirm_top_k` best distinct configurations of the search (by their best epoch's score, seed
        aside), each with every seed of `confirm_seeds`."""
        import math

        from segx.runs.record import DEFAULT_MONITOR, best_value, read_record
        from segx.search.searchers import JOB_KEY

        scored = []
        for result in results:
            config = dict(result.config or {})
            record = read_record(sweep_dir / str(config.pop(JOB_KEY, ""))) or {}
            value = best_value(record, str(record.get("monitor", DEFAULT_MONITOR)))
            if not math.isnan(value):
                scored.append((value, {k: str(v) for k, v in config.items() if k != "seed"}))
        chosen: list[dict[str, str]] = []
        for _, values in sorted(scored, key=lambda item: -item[0]):
            if values not in chosen and len(chosen) < self.confirm_top_k:
                chosen.append(values)
        return [{**values, "seed": str(seed)} for values in chosen for seed in self.confirm_seeds]

    def _searcher(self, space: Any, trials: int, sweep_dir: Path) -> Any:
        from segx.search.searchers import GridSearcher, NumberedSearcher, optuna_distribution
        from segx.search.space import Distribution

        if self.search == "grid":
            # ASHA and Hyperband judge a trial against those that came before it; successive halving waits for all
            shuffle = self.grid_order == "shuffled" or (self.grid_order == "auto" and
                                                        self.scheduler_name in ("asha", "hyperband"))
            return GridSearcher(space, self.num_samples, self.seed, metric="score", mode="max", shuffle=shuffle)
        everything = {**{k: Distribution("choice", values=tuple(v)) for k, v in space.grid.items()},
                      **space.distributions}  # random and optuna sample the grid's axes too
        if self.search == "random":
            from segx.search.space import SearchSpace

            sampled = SearchSpace(distributions=everything, fixed=space.fixed)
            return GridSearcher(sampled, trials, self.seed, metric="score", mode="max")
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from ray.tune.search.optuna import OptunaSearch

        sweep_dir.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(sweep_dir / OPTUNA_JOURNAL)))  # for optuna-dashboard
        inner = OptunaSearch(space={k: optuna_distribution(d) for k, d in everything.items()}, metric="score",
                             mode="max", sampler=optuna.samplers.TPESampler(seed=self.seed), study_name="segx",
                             storage=storage)
        return NumberedSearcher(inner, trials)

    def _scheduler(self, max_t: int, rungs: list[int], trials: int, state_path: Path) -> Any:
        from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

        if self.scheduler_name == "sha":
            from segx.search.halving import SuccessiveHalving

            return SuccessiveHalving(trials, rungs, self.reduction_factor, max_t, state_path=state_path,
                                     max_running=self.max_concurrent_trials)
        if self.scheduler_name == "asha":  # full-length trials finish as their runs do (stop_last_trials=False)
            return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=self.grace_period,
                                 reduction_factor=self.reduction_factor, stop_last_trials=False)
        if self.scheduler_name == "hyperband":
            return HyperBandScheduler(time_attr="epoch", max_t=max_t, reduction_factor=self.reduction_factor,
                                      stop_last_trials=False)
        return FIFOScheduler()


def _json_logger() -> list:
    """Tune's JSON logger only (its result.json is read on restore); the others are turned off above."""
    from ray.tune.logger import JsonLoggerCallback

    return [JsonLoggerCallback()]


def _require_tune(search: str) -> None:
    """Ray Tune (and Optuna for search=optuna) are the `tune` extra: say so in one paragraph when missing."""
    import importlib

    for module in ("ray.tune", *(("optuna",) if search == "optuna" else ())):
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ConfigError(
                f"hydra/sweeper=tune needs {module}, which cannot be imported here ({error}). Install segx's tune "
                "extra: pip install 'segx[tune]' (Ray Tune with pandas and pyarrow, and Optuna), or run the sweep "
                "with Hydra's basic sweeper (drop hydra/sweeper=tune).") from None


def best_trial_line(sweep_dir: Path, monitor: str) -> str:
    """The search's best trial by its best epoch in segx's records (Ray's own summary reads each trial's last
    report before its final epoch is in)."""
    from segx.runs.discovery import find_runs
    from segx.runs.record import best_value

    scored = [(best_value(run.record, monitor), int(run.run_dir.name), run) for run in find_runs([sweep_dir])
              if run.run_dir.name.isdigit()]
    scored = [item for item in scored if item[0] == item[0]]  # NaN: no score recorded
    if not scored:
        return f"No trial of {sweep_dir} recorded a {monitor}."
    value, job, run = max(scored, key=lambda item: (item[0], -item[1]))
    epoch = (run.record.get("best") or {}).get("epoch")
    at = f" at epoch {int(epoch) + 1}" if isinstance(epoch, int | float) else ""
    settings = " ".join(run.record.get("overrides") or [])
    return f"Best trial: job {job}, {monitor} {value:.4f}{at} ({run.status}): {settings}"


def _record_interrupted(results: Any, sweep_dir: Path, space: Any) -> None:
    """Tune ends early only on Ctrl-C, keeping its state: trials still running then are recorded as interrupted
    (as a single run's would be) and the sweep exits 130; the same command resumes them from their last.ckpt."""
    from segx.runs.job import record_worker_death
    from segx.runs.record import read_record
    from segx.runs.status import ACTIVE, CTRL_C, EXIT_CODES
    from segx.search.searchers import JOB_KEY
    from segx.search.trial import trial_overrides

    running = [result.config for result in results if result.config and JOB_KEY in result.config
               and (read_record(sweep_dir / str(result.config[JOB_KEY])) or {}).get("status") in ACTIVE]
    if not running:
        return
    for config in running:
        job = int(config[JOB_KEY])
        record_worker_death(sweep_dir / str(job), job, trial_overrides(config, space), "tune",
                            f"interrupted by {CTRL_C}: run the same sweep command again to resume it")
    log.error("Search interrupted by Ctrl-C: %d running trial(s) recorded as interrupted; run the same command "
              "again (hydra.sweep.dir=%s) to resume the search where it stopped.", len(running), sweep_dir)
    raise SystemExit(EXIT_CODES[CTRL_C])
