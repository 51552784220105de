"""Synchronous successive halving (`hydra.sweeper.scheduler=sha`): the rung rules, the parts of Ray Tune it relies
on, and a real search on 2 simulated GPUs that is interrupted with Ctrl-C and resumed."""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import statistics
from pathlib import Path

import pytest

from segx.runs.record import read_record
from segx.runs.status import COMPLETED, FAILED, STOPPED
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES
from tests.ray_processes import interrupt_sweep, run_sweep

pytest.importorskip("ray.tune", reason="the tune extra (pip install segx[tune]) is not installed")

from segx.search.halving import Ladder  # noqa: E402


def _run_ladder(scores: dict[int, list[float]], order: list[int], rungs: list[int], eta: float) -> dict[int, int]:
    """Every job trained one at a time in `order` (promoted ones as they are freed): job → epochs it trained."""
    ladder = Ladder(len(scores), rungs, eta)
    for job in order:
        ladder.add(job)
    trained = dict.fromkeys(scores, 0)
    queue = list(order)
    while queue:
        job = queue.pop(0)
        while trained[job] < len(scores[job]):
            trained[job] += 1
            fate, promoted, _ = ladder.arrive(job, trained[job], scores[job][trained[job] - 1])
            queue += [j for j in promoted if j != job]
            if fate != "continue":
                break
    return trained


def test_every_arrival_order_halves_the_same_grid_the_same_way() -> None:
    """6 configurations, rungs after epochs 1 and 2, η 2: the best 3 at epoch 1 train a second epoch, the best one
    of those all 4. Job 4 is a late bloomer (last at epoch 1 but one) and job 5 ties job 2 at epoch 1."""
    scores = {0: [0.5, 0.6, 0.7, 0.8], 1: [0.4, 0.7, 0.8, 0.85], 2: [0.3, 0.35, 0.4, 0.4], 3: [0.1, 0.1, 0.1, 0.1],
              4: [0.2, 0.9, 0.95, 0.99], 5: [0.3, 0.3, 0.3, 0.3]}
    for order in itertools.permutations(range(6)):
        trained = _run_ladder(scores, list(order), [1, 2], 2)
        # rung 1 keeps 0, 1 and 2 (2 and 5 tie at 0.3: the lower job number goes on); rung 2 keeps 1 (0.7)
        assert trained == {0: 2, 1: 4, 2: 2, 3: 1, 4: 1, 5: 1}, order


def test_a_trial_that_ends_before_its_rung_leaves_it_and_a_nan_score_ranks_last() -> None:
    ladder = Ladder(4, [1], 2)
    for job in range(4):
        ladder.add(job)
    assert ladder.arrive(0, 1, float("nan"))[0] == "wait"
    assert ladder.arrive(1, 1, 0.1)[0] == "wait"
    assert ladder.end(2) == ([], [])  # failed before epoch 1: the rung still waits for job 3
    fate, promoted, dropped = ladder.arrive(3, 1, 0.05)
    # keep ⌊4 / 2⌋ = 2 of the 3 that arrived: 1 (0.1) and 3 (0.05); the NaN is last
    assert (fate, sorted(promoted), dropped) == ("continue", [1, 3], [0])
    assert ladder.runnable(1) and not ladder.runnable(0)
    assert ladder.arrive(0, 1, 0.9)[0] == "stop"  # a dropped job's late report changes nothing


def test_the_scheduler_limits_the_trials_training_at_once_itself_and_never_waits_forever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune's max_concurrent_trials counts paused trials, so two trials waiting at a rung would block the rest of
    the grid: the scheduler keeps the limit instead. If trials still never come, it waits STALL_SECONDS for them, then
    decides the rung among those that did (a late one is then stopped) rather than hang."""
    from segx.search import halving
    from segx.search.halving import SuccessiveHalving
    from segx.search.replay import PAUSED, RUNNING, SimController, SimTrial

    scheduler = SuccessiveHalving(4, [1], 2, max_t=3, max_running=2)
    trials = [SimTrial(f"t{i}", {"_job": i}, []) for i in range(4)]
    controller = SimController(scheduler, trials[:2])  # only two of the four announced trials ever come
    for trial in controller.trials:
        scheduler.on_trial_add(controller, trial)
    for trial in controller.trials:
        assert scheduler.choose_trial_to_run(controller) is trial
        trial.status = RUNNING
    assert scheduler.choose_trial_to_run(controller) is None  # two train: the limit
    for trial, score in zip(controller.trials, (0.2, 0.1), strict=True):
        assert scheduler.on_trial_result(controller, trial, {"epoch": 1, "score": score}) == "PAUSE"
        trial.status = PAUSED
    assert scheduler.choose_trial_to_run(controller) is None  # Tune may yet create the other two
    monkeypatch.setattr(halving, "STALL_SECONDS", 0.0)
    assert scheduler.choose_trial_to_run(controller) is controller.trials[0]  # decided among the two: job 0 goes on
    assert controller.trials[1].status == "TERMINATED"
    late = trials[2]
    controller.trials.append(late)
    scheduler.on_trial_add(controller, late)
    assert scheduler.on_trial_result(controller, late, {"epoch": 1, "score": 0.9}) == "STOP"


def test_a_trial_retried_after_a_lost_worker_keeps_its_place_at_the_rung() -> None:
    """Tune requeues a trial whose worker was lost with on_trial_error then on_trial_add: the rung waits for it and
    judges it with the others. A trial that fails for good (no retry left) leaves the rung instead."""
    from ray.tune.experiment import Trial

    from segx.search.halving import SuccessiveHalving
    from segx.search.replay import SimController

    def search() -> tuple[SuccessiveHalving, SimController, list[Trial]]:
        scheduler = SuccessiveHalving(3, [2], 3, max_t=4)
        trials = [Trial("segx", config={"_job": n}, stub=True, max_failures=1) for n in range(3)]
        controller = SimController(scheduler, trials)
        for trial in trials:
            scheduler.on_trial_add(controller, trial)
            trial.status = Trial.RUNNING
        assert scheduler.on_trial_result(controller, trials[0], {"epoch": 1, "score": 0.9}) == "CONTINUE"
        for trial in trials[1:]:  # the other two wait at the rung
            assert scheduler.on_trial_result(controller, trial, {"epoch": 2, "score": 0.5}) == "PAUSE"
            trial.status = Trial.PAUSED
        return scheduler, controller, trials

    scheduler, controller, trials = search()
    lost = trials[0]  # its node died after epoch 1: Tune's _try_recover
    lost.run_metadata.num_failures, lost.status = 1, Trial.ERROR
    scheduler.on_trial_error(controller, lost)
    lost.status = Trial.PENDING
    scheduler.on_trial_add(controller, lost)
    assert not any(scheduler.ladder.decided) and scheduler.choose_trial_to_run(controller) is lost
    lost.status = Trial.RUNNING
    assert scheduler.on_trial_result(controller, lost, {"epoch": 1, "score": 0.9}) == "CONTINUE"  # its resume
    assert scheduler.on_trial_result(controller, lost, {"epoch": 2, "score": 0.8}) == "CONTINUE"  # judged: best
    assert [t.status for t in trials[1:]] == [Trial.TERMINATED, Trial.TERMINATED]
    assert scheduler.ladder.jobs[0].scores == {"0": 0.8}

    scheduler, controller, trials = search()
    failed = trials[0]  # failed again with no retry left: Tune's final on_trial_error, the trial still RUNNING
    failed.run_metadata.num_failures = 2
    scheduler.on_trial_error(controller, failed)
    assert scheduler.ladder.decided == [True] and scheduler.ladder.jobs[1].state == "running"  # job 1 goes on


def test_the_ladder_survives_a_save_and_refuses_another_search_s_state(tmp_path: Path) -> None:
    from segx.search.halving import SuccessiveHalving

    first = SuccessiveHalving(3, [1, 2], 3, max_t=4, state_path=tmp_path / "state.json")
    for job in range(3):
        first.ladder.add(job)
    first.ladder.arrive(0, 1, 0.4)
    first._save()
    again = SuccessiveHalving(3, [1, 2], 3, max_t=4, state_path=tmp_path / "state.json")
    again._load_once()
    assert again.ladder.to_dict() == first.ladder.to_dict()
    other = SuccessiveHalving(4, [1, 2], 3, max_t=4)
    with pytest.raises(ValueError, match="rungs"):
        other.restore(str(tmp_path / "state.json"))


def test_the_parts_of_ray_tune_successive_halving_relies_on_are_there() -> None:
    """Fails loudly when a Ray release changes them: the scheduler's hooks (with the arguments Tune passes), its
    decisions, a paused trial's statuses, the controller's calls the scheduler makes, what a restored experiment
    does with unfinished trials, and that a function trainable's pause keeps no checkpoint of its own."""
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler
    from ray.tune.trainable.function_trainable import FunctionTrainable

    hooks = {"on_trial_add": ["tune_controller", "trial"], "on_trial_result": ["tune_controller", "trial", "result"],
             "on_trial_complete": ["tune_controller", "trial", "result"],
             "on_trial_error": ["tune_controller", "trial"], "on_trial_remove": ["tune_controller", "trial"],
             "choose_trial_to_run": ["tune_controller"], "save": ["checkpoint_path"],
             "restore": ["checkpoint_path"]}
    for name, parameters in hooks.items():
        assert list(inspect.signature(getattr(FIFOScheduler, name)).parameters)[1:] == parameters, name
    assert (TrialScheduler.CONTINUE, TrialScheduler.PAUSE, TrialScheduler.STOP) == ("CONTINUE", "PAUSE", "STOP")
    assert {Trial.PENDING, Trial.RUNNING, Trial.PAUSED, Trial.TERMINATED} == {"PENDING", "RUNNING", "PAUSED",
                                                                            "TERMINATED"}
    for method in ("get_trials", "stop_trial", "pause_trial", "_requeue_restored_trials"):
        assert callable(getattr(TuneController, method)), method
    # a restored experiment puts its unfinished trials (paused ones too) back as PENDING: choose_trial_to_run holds
    # the ones waiting at a rung
    assert "trial_to_add.set_status(Trial.PENDING)" in inspect.getsource(TuneController._requeue_restored_trials)
    # stop_trial on a paused trial tells the scheduler through on_trial_remove and the callbacks (TrialOutcomes)
    stop = inspect.getsource(TuneController.stop_trial)
    assert "on_trial_remove" in stop and "self._callbacks.on_trial_complete" in stop
    # pausing a function trial "saves" its last reported result: segx reports no checkpoint, the run resumes from
    # its own last.ckpt
    assert "_last_training_result" in inspect.getsource(FunctionTrainable.save_checkpoint)
    # a searcher of segx's own gets one pending trial unless this variable says more: the sweeper raises it under
    # successive halving, or the trials a resumed search puts back as pending would keep the rest from being created
    from ray.tune.execution import tune_controller

    assert "TUNE_MAX_PENDING_TRIALS_PG" in inspect.getsource(tune_controller._get_max_pending_trials)
    # a trial whose worker was lost is marked ERROR (by _schedule_trial_stop) before it is requeued, and the
    # requeue calls on_trial_error then on_trial_add: successive halving tells a retry from a final failure by it
    recover = inspect.getsource(TuneController._try_recover)
    assert recover.index("_schedule_trial_stop") < recover.index("_requeue_trial")
    requeue = inspect.getsource(TuneController._requeue_trial)
    assert requeue.index("on_trial_error") < requeue.index("on_trial_add")
    assert "Trial.ERROR if exception" in inspect.getsource(TuneController._schedule_trial_stop)
    # a function trial's actor stops without waiting for its run (segx.search.trial.end_the_run_first waits)
    assert "session.finish(timeout=0)" in inspect.getsource(FunctionTrainable.cleanup)


def test_the_late_bloomer_survives_successive_halving_where_asha_drops_it() -> None:
    """A scripted grid of 12 × 12 epochs: configuration 0 is last but one at epoch 1 and best from epoch 3 on (SGD at
    a high learning rate); the others plateau early. Over 200 trial orders, ASHA (grace 1, η 3) drops it whenever
    the early leaders reached the first rung before it; successive halving (rungs 2 and 6, η 3) ranks all 12 at
    epoch 2, where it is 4th, and always keeps it."""
    from segx.search.replay import Grid, factory, replay

    late = [0.02, 0.30, 0.60, 0.80, 0.85, 0.88, 0.89, 0.90, 0.90, 0.90, 0.90, 0.90]
    others = [[min(0.75, 0.1 + 0.01 * i + 0.05 * epoch) for epoch in range(12)] for i in range(1, 12)]
    others[0][0] = 0.01  # one weaker still at epoch 1
    grid = Grid({f"c{i:02d}": {"1": curve} for i, curve in enumerate([late, *others])}, 12)
    sha = replay(grid, "sha", factory("sha", grace_period=2, reduction_factor=3), workers=1, orders=200).row()
    asha = replay(grid, "asha", factory("asha", grace_period=1, reduction_factor=3), workers=1, orders=200).row()
    assert sha["p_same_winner"] == 1.0 and sha["fraction_max"] == sha["fraction_min"]  # the same in every order
    assert sha["fraction_median"] == pytest.approx((12 * 2 + 4 * 4 + 1 * 6) / 144)
    assert asha["p_same_winner"] < 0.5, asha
    assert asha["fraction_median"] < sha["fraction_median"] + 0.2  # ASHA is not simply training more


def test_the_replay_s_sha_and_asha_are_the_tune_sweeper_s_defaults() -> None:
    """The bench's headline rows and the report's "what if" replay the schedulers a user gets without options."""
    from omegaconf import OmegaConf

    from segx.search.replay import DEFAULT_SCHEDULERS
    from tests.conftest import ROOT

    shipped = OmegaConf.load(ROOT / "conf" / "hydra" / "sweeper" / "tune.yaml")
    for kind in ("sha", "asha"):
        assert DEFAULT_SCHEDULERS[kind] == {"kind": kind, "grace_period": shipped.grace_period,
                                            "reduction_factor": shipped.reduction_factor}
    assert shipped.rungs is None


def test_replayed_schedulers_are_ray_s_own_objects_under_pause_and_stop() -> None:
    """HyperBand pauses and resumes trials, median stopping reads the live trials: both run in the simulation, and
    the top-k baseline trains k trials to the end."""
    from segx.search.replay import Grid, factory, replay

    curves = {f"c{i}": {"1": [0.1 * i + 0.01 * e for e in range(9)], "2": [0.1 * i + 0.02 * e for e in range(9)]}
              for i in range(6)}
    grid = Grid(curves, 9)
    # the noise: the seed spread of the best configuration's best score (0.58 with seed 1, 0.66 with seed 2)
    assert grid.best_config() == "c5" and grid.noise() == pytest.approx(statistics.stdev([0.58, 0.66]))
    for kind in ("hyperband", "median"):
        row = replay(grid, kind, factory(kind, reduction_factor=3), workers=4, orders=20).row()
        assert row["runs"] == 40 and 0 < row["fraction_median"] <= 1 and row["p_same_winner"] == 1.0, row
    topk = replay(grid, "top 2", factory("topk", keep=2), workers=1, orders=10).row()
    assert topk["fraction_median"] == pytest.approx((6 + 2 * 8) / 54) and topk["p_same_winner"] == 1.0


def _epoch_lines(output: str) -> list[tuple[int, int]]:
    """(job, epoch) of each "Epoch k/n" line a trial printed."""
    return [(int(job), int(epoch)) for job, epoch in re.findall(r"\(job (\d+) pid=\d+\).*?Epoch (\d+)/\d+", output)]


@pytest.mark.slow
def test_a_halving_grid_pauses_resumes_and_survives_ctrl_c_training_exactly_its_rungs(shapes_root: Path,
                                                                                    tmp_path: Path) -> None:
    """6 configurations × 4 epochs, rungs after epochs 1 and 2 (η 2), two trials at a time on 2 simulated GPUs. The
    two with lr=-1 fail at once and leave the first rung; of the 4 that reach it the best 3 (⌊6 / 2⌋) train a second
    epoch, the best of those all 4. Ctrl-C while the first rung fills, then the same command: the search finishes
    where it stood, no epoch is trained twice, the failures end neither run, and every record is final."""
    overrides = [*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none",
                 "trainer.max_epochs=4", "optimizer.lr=3e-3,1e-3,-1", "seed=1,2", "hydra/sweeper=tune",
                 "hydra.sweeper.rungs=[1,2]", "hydra.sweeper.reduction_factor=2",
                 "hydra.sweeper.ray.init.address=local", "hydra.sweeper.ray.init.num_gpus=2",
                 "hydra.sweeper.ray.init.num_cpus=2", f"hydra.sweep.dir={tmp_path}"]

    def filling() -> bool:  # the first two trials wait at the first rung; the next two start their first epoch
        reached = [bool((read_record(tmp_path / str(n)) or {}).get("history")) for n in range(4)]
        return sum(reached) >= 2

    # Ctrl-C once two trials wait at the rung. When the next two reach it too (a busy machine may be slow to deliver
    # the signal) the rung may be decided before the driver stops: the outcome below is the same either way, so the
    # test asserts only what holds in every order. The time limits guard against a hang, not a slow machine.
    interrupted = interrupt_sweep(*overrides, ready=filling, timeout=900, wait=600)
    assert interrupted.returncode == 130, interrupted.stdout[-3000:]
    state = json.loads((tmp_path / ".tune" / "segx-halving.json").read_text())
    assert state["rungs"] == [1, 2], state

    result = run_sweep(*overrides, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]  # for the two failed trials only
    records = [read_record(tmp_path / str(n)) for n in range(6)]
    assert [r["status"] for r in records[4:]] == [FAILED, FAILED] and not records[4].get("history")
    epochs = {n: len(r["history"]) for n, r in enumerate(records[:4])}
    assert sorted(epochs.values()) == [1, 2, 2, 4], epochs  # 9 epochs
    assert all([int(h["epoch"]) for h in r["history"]] == list(range(len(r["history"]))) for r in records[:4])
    # no epoch twice: each trial's "Epoch k/4" lines over both runs (an epoch cut by Ctrl-C prints none)
    lines = _epoch_lines(interrupted.stdout) + _epoch_lines(output)
    assert sorted(lines) == sorted(set(lines)) and len(lines) == 9, lines
    # the ranking: the best three at epoch 1 went on, and the best of those at epoch 2 trained to the end
    at = {n: [h["val/miou"] for h in records[n]["history"]] for n in range(4)}
    first = sorted(range(4), key=lambda n: (-at[n][0], n))
    assert {n for n in range(4) if epochs[n] >= 2} == set(first[:3])
    assert epochs[min(first[:3], key=lambda n: (-at[n][1], n))] == 4
    for n in range(4):  # every record final: the full one completed, the others stopped at their rung
        raw = json.loads((tmp_path / str(n) / "metrics.json").read_text())
        if epochs[n] == 4:
            assert raw["status"] == COMPLETED
        else:
            assert (raw["status"], raw["stopped_at_epoch"], raw["stopped_by"]) == (STOPPED, epochs[n],
                                                                                 "successive halving"), raw
    # every pause and stop ended its run before its process exited: no crash dump, and each attempt says how it ended
    assert "Fatal Python error" not in interrupted.stdout + output and "SIGABRT" not in interrupted.stdout + output
    attempts = [a for r in records[:4] for a in r["attempts"]]
    assert all("ended" in a and "ended_at" in a for a in attempts), attempts
    # a pause, once the trial resumed, and a stop, once the search decided it, each say which it was
    assert any(a["ended"] == "ended by Ray Tune after epoch 1: paused at a rung" for a in attempts), attempts
    assert all(r["attempts"][-1]["ended"] == f"ended by Ray Tune after epoch {len(r['history'])}: stopped by "
               "successive halving" for r in records[:4] if r["status"] == STOPPED), records
    assert all(r["started_at"] == r["attempts"][0]["started_at"] for r in records[:4])
    assert "resumes after epoch" in output and "Successive halving, rung 1 (epoch 1): 3 of 6" in output
    assert "6 jobs, 1 completed, 2 failed, 3 stopped early by the scheduler" in output
    assert "start the search again in a new hydra.sweep.dir" in output


@pytest.mark.slow
def test_a_paused_trial_s_run_ends_before_its_process_does(tmp_path: Path) -> None:
    """Tune's own cleanup stops a paused trial's actor without waiting for its training thread, which goes on with
    native work after an asynchronous report: the process then aborts ("Fatal Python error: Aborted") and its
    teardown never runs. With the sweeper's cleanup, each paused trial ends its run first."""
    import subprocess
    import sys
    import uuid

    from tests.ray_processes import ROOT, TAG, OwnProcesses

    own = OwnProcesses(uuid.uuid4().hex)
    result = subprocess.run([sys.executable, "-m", "tests.pause_trial", str(tmp_path)], cwd=ROOT,
                            env={**os.environ, TAG: own.tag, "PYTHONUNBUFFERED": "1"}, capture_output=True,
                            text=True, timeout=600)
    own.wait_until_gone()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Fatal Python error" not in output and "SIGABRT" not in output, output[-4000:]
    assert len(list(tmp_path.glob("teardown-0-*"))) == 1 and len(list(tmp_path.glob("teardown-1-*"))) == 1
