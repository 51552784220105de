"""`hydra/launcher=gpus`: hydra-ray-launcher with each job named in the log and a dead worker isolated.

Ray does the scheduling (one job per GPU it hands out, on one machine or a cluster); this subclass only
changes what the plugin leaves rough for sweeps: a request the cluster cannot hold is fitted (no GPU
anywhere: the jobs run on CPUs) or refused before any job starts, instead of Ray waiting for it forever;
log lines are prefixed `(job N pid=...)` instead of `(_run_job pid=...)`, Ray does not fold identical
lines of different jobs into one, and a job whose worker died after all its retries is recorded as failed
in its own run directory instead of aborting the results of every other job.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from segx.core.errors import ConfigError, first_line
from segx.runs.job import JobInfo, finished_earlier, job_end_line, record_worker_death, skipped, stop_message
from segx.runs.record import read_record
from segx.runs.retries import lost_worker_errors, retry_line
from segx.runs.status import ACTIVE, CTRL_C, EXIT_CODES, FAILED

log = logging.getLogger(__name__)

OPTION = "hydra.launcher.ray.remote"
LOG_DRAIN_S = 1.0  # seconds: Ray's log monitor forwards a worker's last lines after the job has returned
# Ray's resource names for the ray.remote arguments a job asks with, and the words the log uses for them.
_ASKED_WITH = {"GPU": ("num_gpus", "GPU(s)"), "CPU": ("num_cpus", "CPU(s)"), "memory": ("memory", "bytes of memory")}
_MORE_FROM = {
    "GPU": " (a fraction such as 0.5 puts two jobs on one GPU), or let Ray hand out more GPUs per node "
           "(hydra.launcher.ray.init.num_gpus on this machine, bigger nodes on a cluster)",
    "CPU": ", or let Ray hand out more CPUs per node (hydra.launcher.ray.init.num_cpus on this machine, bigger "
           "nodes on a cluster)",
}


def _run_dir(sweep_config: Any) -> Path:
    return Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)


def _finished(idx: int, overrides: list[str], sweep_config: DictConfig) -> JobReturn | None:
    """The job's result when its run directory holds it completed or stopped (see segx.runs.job.finished_earlier)."""
    run_dir = _run_dir(sweep_config)
    job = JobInfo(run_dir=run_dir, multirun=True, num=idx, overrides=list(overrides), launcher="gpus")
    previous = finished_earlier(job)
    return None if previous is None else _job_return(overrides, sweep_config, skipped(job, previous))


def _job_return(overrides: list[str], sweep_config: DictConfig, value: float) -> JobReturn:
    """A job the launcher ended itself (skipped, or failed with its worker), as Hydra gets a finished one back."""
    return JobReturn(overrides=list(overrides), cfg=sweep_config, hydra_cfg=sweep_config,
                     working_dir=str(_run_dir(sweep_config)), task_name=str(sweep_config.hydra.job.name),
                     status=JobStatus.COMPLETED, _return_value=value)


def _number(amount: float) -> str:
    return f"{amount:g}"


def _requested(remote: dict) -> dict[str, float]:
    """The resources one job asks Ray for, by Ray's names; a task without num_cpus takes one CPU."""
    cpus = remote.get("num_cpus")
    asked = {"CPU": float(1 if cpus is None else cpus), "GPU": float(remote.get("num_gpus") or 0)}
    if remote.get("memory"):
        asked["memory"] = float(remote["memory"])
    asked.update({name: float(amount) for name, amount in (remote.get("resources") or {}).items()})
    return {name: amount for name, amount in asked.items() if amount > 0}


def _option(resource: str, amount: float) -> str:
    key = _ASKED_WITH[resource][0] if resource in _ASKED_WITH else f"resources.{resource}"
    return f"{OPTION}.{key}={_number(amount)}"


def fit_to_cluster(remote: dict, nodes: list[dict[str, float]], jobs: int,
                   prefix: str = "hydra.launcher") -> tuple[dict, str | None]:
    """Each job's ray.remote arguments checked against the alive nodes' resources (Ray waits forever for a
    request no node can hold): with no GPU in the cluster the jobs run on CPUs (num_gpus 0, and the line that
    says so is returned); a request no single node can satisfy raises ConfigError. `prefix` is where the
    options live (`hydra.sweeper` for the tune sweeper), for the messages."""
    try:
        fitted, note = _fit(remote, nodes, jobs)
    except ConfigError as error:
        raise ConfigError(str(error).replace("hydra.launcher.", f"{prefix}.")) from None
    return fitted, note and note.replace("hydra.launcher.", f"{prefix}.")


def _fit(remote: dict, nodes: list[dict[str, float]], jobs: int) -> tuple[dict, str | None]:
    fitted, note = dict(remote), None
    gpus = _requested(remote).get("GPU", 0.0)
    if gpus and not any(node.get("GPU", 0) for node in nodes):
        fitted["num_gpus"] = 0
        cpus = sum(node.get("CPU", 0) for node in nodes)
        note = (f"The Ray cluster has no GPU ({len(nodes)} node(s), {_number(cpus)} CPU(s)): running the {jobs} "
                f"job(s) on CPUs instead of {_option('GPU', gpus)} each")
    asked = _requested(fitted)
    if any(all(node.get(name, 0) >= amount for name, amount in asked.items()) for node in nodes):
        return fitted, note
    largest = {name: max((node.get(name, 0) for node in nodes), default=0) for name in asked}
    too_big = [name for name, amount in asked.items() if amount > largest[name]]
    words = {name: _ASKED_WITH.get(name, (name, f"of resource {name!r}"))[1] for name in asked}
    if too_big:
        problems = "; ".join(f"{_option(name, asked[name])} asks for {_number(asked[name])} {words[name]} per job, "
                             f"but the largest node has {_number(largest[name])}" for name in too_big)
        fixes = "; ".join(f"set {_option(name, largest[name])} or less{_MORE_FROM.get(name, '')}" if largest[name]
                          else f"drop {_option(name, asked[name])}" for name in too_big)
    else:  # each amount fits on some node, but never all of them on the same one
        problems = (f"{' '.join(_option(name, amount) for name, amount in asked.items())} ask for that much of each "
                    "per job, but no single node has all of it at once")
        fixes = "ask each job for at most what one of these nodes has"
    nodes_text = ", ".join("{" + ", ".join(f"{name}: {_number(node.get(name, 0))}" for name in asked) + "}"
                           for node in nodes) or "none alive"
    raise ConfigError(
        f"No node of the Ray cluster can ever run one job as asked, so the sweep would wait forever: {problems}"
        f" (nodes: {nodes_text}). To fix it, {fixes}. If the "
        "cluster adds nodes on demand (an autoscaler), hydra.launcher.check_resources=false launches the jobs "
        "as asked.")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def show_every_log_line() -> None:
    """Ray folds lines that differ only in numbers ("Epoch 3/25 ... [repeated 3x across cluster]"), which
    hides whole jobs' progress. RAY_DEDUP_LOGS=0 turns that off, but Ray reads it when first imported (by
    plugin discovery, before this runs), so the flag it copied is set as well."""
    os.environ["RAY_DEDUP_LOGS"] = "0"
    try:
        from ray._private import ray_logging

        ray_logging.RAY_DEDUP_LOGS = False
    except (ImportError, AttributeError):  # a Ray without that module: the environment variable is all there is
        pass


def skip_ray_metrics(init: dict) -> None:
    """A Ray this sweep starts collects no Prometheus metrics unless the dashboard that shows them is on: their agent
    costs ~2 s of start-up and CPU all along. Set as Ray's environment override, it leaves a cluster this sweep
    joins as it is (ray.init refuses `_system_config` there); an exported RAY_enable_metrics_collection wins."""
    if not init.get("include_dashboard"):
        os.environ.setdefault("RAY_enable_metrics_collection", "0")


def join_cluster(init: dict, prefix: str, sweep_dir: Path, first_job: DictConfig, check_nodes: bool) -> None:
    """Start this sweep's Ray, or join the cluster `init` names and check that every node can run the first job
    (`segx.runs.node_check`); a cluster that cannot be joined or used is one paragraph and exit 2."""
    import ray

    from segx.runs.node_check import check_nodes as check_every_node
    from segx.runs.node_check import job_paths
    from segx.runs.ray_cluster import start_or_join

    try:
        address = start_or_join(init, prefix)
        if address is not None and check_nodes:
            count = check_every_node(sweep_dir, job_paths(first_job))
            log.info("Joined the Ray cluster at %s: its %d node(s) run this code and see the sweep directory and "
                     "the data", address, count)
    except ConfigError as error:
        log.error("%s", error)
        ray.shutdown()  # a driver that joined disconnects; the cluster itself is left as it was
        sys.exit(2)


class GpuLauncher(RayLauncher):
    """Launches every job as a Ray task with `hydra.launcher.ray.remote` resources (one GPU by default)."""

    def __init__(self, ray: DictConfig, check_resources: bool = True, check_nodes: bool = True) -> None:
        super().__init__(ray)
        self.check_resources = check_resources
        self.check_nodes = check_nodes

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray  # here, not at the top: Hydra imports every plugin module of every command, sweep or not
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        show_every_log_line()
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        init = OmegaConf.to_container(self.ray_cfg.init, resolve=True)
        remote = OmegaConf.to_container(self.ray_cfg.remote, resolve=True)
        own_ray = not ray.is_initialized()  # a Ray this sweep starts ends with it; a caller's own Ray is left running
        skip_ray_metrics(init)
        first = self.hydra_context.config_loader.load_sweep_config(self.config, list(job_overrides[0]))
        join_cluster(init, "hydra.launcher", sweep_dir, first, self.check_nodes)
        if self.check_resources:
            try:
                remote, note = fit_to_cluster(remote, alive_nodes(), len(job_overrides))
            except ConfigError as error:  # a user's mistake: one paragraph and exit 2, as a single run's would be
                log.error("%s", error)
                ray.shutdown()  # this sweep's Ray ends now, not at interpreter exit
                sys.exit(2)
            if note:
                log.warning("%s", note)
        log.info("Launching %d jobs on Ray (%s GPU(s) each) into %s", len(job_overrides), remote.get("num_gpus", 0),
                 sweep_dir)

        # The launcher retries a lost worker itself (Ray's own retry is silent and leaves the record as it was):
        # it names the job and the node it lost on the console and in the job's record.
        retries, lost_worker = int(remote.get("max_retries", 3) or 0), lost_worker_errors()

        def submit(idx: int, sweep_config: DictConfig) -> Any:
            return launch_job_on_ray(self.hydra_context,
                                     OmegaConf.create({**remote, "max_retries": 0, "name": f"job {idx}"}),
                                     sweep_config, self.task_function, Singleton.get_state())

        launched = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
            launched.append((idx, list(overrides), sweep_config, None))

        results: dict[int, JobReturn] = {}
        for n, (idx, overrides, sweep_config, _) in enumerate(launched):
            # a re-run of the sweep skips its completed jobs here, without starting a Ray worker for each
            done = _finished(idx, overrides, sweep_config)
            if done is not None:
                results[idx] = done
            else:
                launched[n] = (idx, overrides, sweep_config, submit(idx, sweep_config))
        pending = {item[3]: item for item in launched if item[3] is not None}
        lost: dict[int, int] = {}  # job → workers lost so far
        try:
            while pending:  # as the jobs finish, in any order
                [ref], _ = ray.wait(list(pending), num_returns=1)
                idx, overrides, sweep_config, _ = item = pending.pop(ref)
                try:
                    results[idx] = ray.get(ref)
                except lost_worker as error:
                    lost[idx] = lost.get(idx, 0) + 1
                    if lost[idx] > retries:
                        results[idx] = self._worker_died(idx, overrides, sweep_config, retries, error)
                    else:
                        log.warning("%s", retry_line(idx, _run_dir(sweep_config), error, lost[idx], retries,
                                                     "hydra.launcher.ray.remote.max_retries"))
                        again = submit(idx, sweep_config)
                        pending[again] = (idx, overrides, sweep_config, again)
                        continue
                except ray.exceptions.RayError as error:
                    results[idx] = self._worker_died(idx, overrides, sweep_config, lost.get(idx, 0), error)
                ended = read_record(_run_dir(sweep_config)) or {}
                if pending and ended.get("shared_failure"):
                    self._stop(item, list(pending.values()))  # its paragraph names the job and its error
                # the job's own lines stay in its log; a failure's line is its one error line on this console
                log.log(logging.ERROR if ended.get("status") == FAILED else logging.INFO, "%s",
                        job_end_line(idx, _run_dir(sweep_config)))
        except KeyboardInterrupt:
            self._interrupted(list(pending.values()))
        if own_ray:  # now, not at interpreter exit: a process that runs more than one sweep gets a Ray each
            time.sleep(LOG_DRAIN_S)  # Ray forwards the workers' last lines a moment after they are written
            ray.shutdown()
        return [results[item[0]] for item in launched]

    @staticmethod
    def _end_unfinished(unfinished: list[tuple], why: str) -> tuple[int, int]:
        """Ray is shut down first (its queued jobs are cancelled, its running ones end before they write their
        records); each job that was running is then recorded as failed with `why`. (running, not started)."""
        import ray

        ray.shutdown()
        running = not_started = 0
        for idx, overrides, sweep_config, _ in unfinished:
            run_dir = _run_dir(sweep_config)
            record = read_record(run_dir)
            if record is None:
                not_started += 1
            elif record.get("status") in ACTIVE:
                record_worker_death(run_dir, idx, list(filter_overrides(overrides)), "gpus", why)
                running += 1
        return running, not_started

    def _stop(self, failed: tuple, unfinished: list[tuple]) -> None:
        """A job failed in a way every job would (the dataset cannot be read, and the sweep varies no data
        setting): the jobs not yet finished are cancelled, those already running recorded as stopped by it."""
        stopped, not_started = self._end_unfinished(
            unfinished, f"stopped: job {failed[0]} failed in a way every job of the sweep would")
        error = (read_record(_run_dir(failed[2])) or {}).get("error", "")
        sweep_dir = Path(str(failed[2].hydra.sweep.dir))
        left = f"{not_started} job(s) were not started and {stopped} running job(s) were stopped"
        log.error("Job %d failed: %s\n%s", failed[0], error, stop_message(failed[0], sweep_dir, left))
        sys.exit(2)

    def _interrupted(self, unfinished: list[tuple]) -> None:
        """Ctrl-C: Ray's workers end with the sweep; the jobs they were running are recorded as a single run's
        would be (interrupted, to resume), and the sweep exits 130 with one line instead of Ray's traceback."""
        marked, not_started = self._end_unfinished(
            unfinished, f"interrupted by {CTRL_C}: run the same sweep command again to resume it")
        log.error("Sweep interrupted by Ctrl-C: %d running job(s) recorded as interrupted, %d not started; run the "
                  "same command again to resume.", marked, not_started)
        sys.exit(EXIT_CODES[CTRL_C])

    @staticmethod
    def _worker_died(idx: int, overrides: list[str], sweep_config: DictConfig, retried: int,
                     error: BaseException) -> JobReturn:
        summary = first_line(error)
        message = (f"The Ray worker running job {idx} died and was retried {retried} time(s) "
                   f"(hydra.launcher.ray.remote.max_retries); Ray said: {summary}")
        record_worker_death(_run_dir(sweep_config), idx, list(filter_overrides(overrides)), "gpus", message)
        # Recorded as failed in its run directory; returned as a finished job so the sweep reports it
        # with the others (SweepSummary) instead of Hydra raising before the summary.
        return _job_return(overrides, sweep_config, float("nan"))
