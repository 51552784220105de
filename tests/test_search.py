"""Search with early stopping (`hydra/sweeper=tune`): the search space read from Hydra's grammar, seeded searchers,
and a real Ray Tune experiment with ASHA on 2 simulated GPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from segx.core.errors import ConfigError
from segx.runs.record import read_record, write_stop_verdict
from segx.runs.status import COMPLETED, FAILED, STOPPED
from segx.search.space import Distribution, parse_space
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES
from tests.ray_processes import run_sweep

ray_tune = pytest.importorskip("ray.tune", reason="the tune extra (pip install segx[tune]) is not installed")


def test_comma_lists_ranges_and_globs_are_grid_axes_and_the_rest_is_sampled() -> None:
    space = parse_space(["optimizer=sgd,adam", "seed=range(1,4)", "optimizer.lr=tag(log, interval(1e-5, 1e-2))",
                         "loss=choice(ce,dice)", "data.batch_size=int(interval(4, 16))", "trainer.max_epochs=3"])
    assert space.grid == {"optimizer": ["sgd", "adam"], "seed": ["1", "2", "3"]}
    assert space.distributions == {
        "optimizer.lr": Distribution("loguniform", low=1e-5, high=1e-2),
        "loss": Distribution("choice", values=("ce", "dice")),
        "data.batch_size": Distribution("uniform", low=4, high=16, integer=True),
    }
    assert space.fixed == ["trainer.max_epochs=3"]
    assert len(space.grid_points()) == 6 and space.grid_points()[1] == {"optimizer": "sgd", "seed": "2"}


def test_a_preset_grid_expands_to_exactly_its_job_count() -> None:
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(ROOT / "conf")))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for name, jobs in {"optimizer_grid": 36, "loss_grid": 42, "compare_models": 36}.items():
            cfg = compose("train", [f"experiment={name}"], return_hydra_config=True)
            params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
            assert len(parse_space(params, loader).grid_points()) == jobs, name
        search = compose("train", ["experiment=optimizer_search"], return_hydra_config=True)  # tune by itself
        assert search.hydra.sweeper._target_.endswith("TuneSweeper") and search.hydra.sweeper.search == "optuna"
        space = parse_space([f"{k}={v}" for k, v in search.hydra.sweeper.params.items()], loader)
        assert not space.grid and space.distributions["optimizer.lr"] == Distribution("loguniform", low=1e-5,
                                                                                       high=1e-2)
        assert space.distributions["loss"].values == ("weighted_ce", "dice", "focal")


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=interval(1e-2, 1e-5)", "lower end must be below the upper"),
    ("optimizer.lr=tag(log, interval(0, 1))", "log interval needs a positive lower end"),
])
def test_an_interval_that_cannot_be_sampled_is_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space([override])


def _suggestions(searcher: object, count: int) -> list[dict]:
    configs = []
    for number in range(count):
        config = searcher.suggest(f"trial{number}")
        if isinstance(config, dict):  # a trial that ran: its score teaches TPE
            searcher.on_trial_complete(f"trial{number}", {"score": 0.1 * (number % 3), "epoch": 1})
        configs.append(config)
    return configs


def test_the_same_seed_samples_the_same_configurations_and_numbers_them_in_order(tmp_path: Path) -> None:
    """TPE over a mixed space (a choice, a log interval, an integer interval), and the grid's random draws."""
    from hydra_plugins.segx_tune_sweeper.tune_sweeper import TuneSweeper

    space = parse_space(["optimizer=sgd,adam", "optimizer.lr=tag(log, interval(1e-5, 1e-2))",
                         "data.batch_size=int(interval(4, 16))"])
    runs = []
    for attempt in range(2):
        sweeper = TuneSweeper(search="optuna", num_samples=6, seed=7)
        runs.append(_suggestions(sweeper._searcher(space, 6, tmp_path / str(attempt)), 7))
    assert runs[0] == runs[1] and runs[0][-1] == "FINISHED"  # 6 trials, then the searcher is done
    trials = runs[0][:6]
    assert [t["_job"] for t in trials] == list(range(6))
    assert {t["optimizer"] for t in trials} <= {"sgd", "adam"}
    assert all(1e-5 <= float(t["optimizer.lr"]) <= 1e-2 and 4 <= int(t["data.batch_size"]) <= 16 for t in trials)
    assert (tmp_path / "0" / "optuna.journal").is_file()  # the study optuna-dashboard opens

    grid = [_suggestions(TuneSweeper(seed=3, scheduler="none")._searcher(space, 2, tmp_path), 3) for _ in range(2)]
    assert grid[0] == grid[1] and [t["optimizer"] for t in grid[0][:2]] == ["sgd", "adam"]
    assert [t["_job"] for t in grid[0][:2]] == [0, 1]


def test_under_asha_a_grid_starts_in_a_seeded_shuffled_order_and_under_halving_in_grid_order() -> None:
    from hydra_plugins.segx_tune_sweeper.tune_sweeper import TuneSweeper

    space = parse_space(["optimizer.lr=1e-4,3e-4,1e-3,3e-3,1e-2,3e-2", "optimizer=sgd,adam"])
    in_order = _suggestions(TuneSweeper(scheduler="none")._searcher(space, 12, Path(".")), 12)
    by_job = {t["_job"]: t for t in in_order}
    for seed in (0, 1):
        shuffled = _suggestions(TuneSweeper(seed=seed, scheduler="asha")._searcher(space, 12, Path(".")), 13)
        assert shuffled == _suggestions(TuneSweeper(seed=seed, scheduler="asha")._searcher(space, 12, Path(".")), 13)
        assert shuffled[-1] == "FINISHED" and sorted(t["_job"] for t in shuffled[:12]) == list(range(12))
        assert [t["_job"] for t in shuffled[:12]] != list(range(12))
        assert all(t == by_job[t["_job"]] for t in shuffled[:12])  # job N is still the grid's N-th point
    kept = _suggestions(TuneSweeper(grid_order="grid", scheduler="asha")._searcher(space, 12, Path(".")), 12)
    assert kept == in_order
    # successive halving ranks a rung once every trial reached it: the order changes nothing, the grid's is kept
    assert _suggestions(TuneSweeper(scheduler="sha")._searcher(space, 12, Path(".")), 12) == in_order
    with pytest.raises(ConfigError, match="hydra.sweeper.grid_order=random is not an order segx knows"):
        TuneSweeper(grid_order="random").check()


def test_a_stop_verdict_makes_a_running_record_stopped_but_leaves_a_completed_one(tmp_path: Path) -> None:
    (tmp_path / "metrics.json").write_text('{"status": "running", "error": "exited with code 0 (sys.exit)"}')
    write_stop_verdict(tmp_path, 2, "ASHA")
    record = read_record(tmp_path)
    assert (record["status"], record["stopped_at_epoch"], record["stopped_by"]) == (STOPPED, 2, "ASHA")
    assert "error" not in record
    (tmp_path / "metrics.json").write_text('{"status": "completed"}')
    assert read_record(tmp_path)["status"] == COMPLETED


def test_a_stopped_trial_s_own_record_is_final_once_the_search_ends(tmp_path: Path) -> None:
    from segx.runs.record import finalize_stopped

    for job, status in enumerate(("running", "completed", "running")):
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps({"status": status, "epochs": 1}))
    write_stop_verdict(tmp_path / "0", 1, "ASHA")
    write_stop_verdict(tmp_path / "1", 1, "ASHA")  # it finished before the verdict landed: its ending stands
    assert finalize_stopped(tmp_path) == [tmp_path / "0"]
    raw = [json.loads((tmp_path / str(job) / "metrics.json").read_text()) for job in range(3)]
    assert (raw[0]["status"], raw[0]["stopped_at_epoch"], raw[0]["stopped_by"]) == (STOPPED, 1, "ASHA")
    assert [r["status"] for r in raw[1:]] == [COMPLETED, "running"]  # job 2 had no verdict


def test_unknown_names_and_ddp_trials_are_refused_in_one_paragraph() -> None:
    from omegaconf import OmegaConf

    from hydra_plugins.segx_tune_sweeper.tune_sweeper import TuneSweeper

    def check(config: str = "trainer: {strategy: auto}", **settings: object) -> None:
        sweeper = TuneSweeper(**settings)
        sweeper.config = OmegaConf.create(config)
        sweeper.check()

    check()
    with pytest.raises(ConfigError, match="grid, random, optuna"):
        check(search="bayes")
    with pytest.raises(ConfigError, match="auto, sha, asha, hyperband, none"):
        check(scheduler="median")
    with pytest.raises(ConfigError, match="cannot run inside a tune trial.*hydra/launcher=gpus"):
        check("trainer: {strategy: ddp}")


def _most_at_once(records: list[dict]) -> int:
    """The most runs that were training at the same moment."""
    from datetime import datetime

    events = sorted((datetime.fromisoformat(r[key]), step) for r in records
                    for key, step in (("started_at", 1), ("ended_at", -1)))
    most = running = 0
    for _, step in events:  # an end sorts before a start at the same instant (-1 < 1)
        running += step
        most = max(most, running)
    return most


def _trial_spans(experiment: Path) -> dict[int, tuple[float, float]]:
    """Each trial's (start, last report) in seconds, from Tune's own result.json: job number → span."""
    spans = {}
    for results in experiment.glob("*/result.json"):
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        if rows:
            first, last = rows[0], rows[-1]
            spans[int(first["config"]["_job"])] = (first["timestamp"] - first["time_total_s"], last["timestamp"])
    return spans


@pytest.mark.slow
def test_asha_stops_the_weak_trials_of_a_grid_two_to_a_simulated_gpu(shapes_root: Path, tmp_path: Path) -> None:
    """lr=1e-12 learns nothing: the two trials with it reach ASHA's first rung after the two good ones have set
    its cut-off (half a GPU each on one simulated GPU: two trials at a time), so they are stopped there; the good
    ones train all 3 epochs. The report then shows the search."""
    from segx.report import collect_runs, write_report

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=mlflow",
                       f"logger.tracking_uri={tracking}", "logger.experiment_name=asha",
                       "trainer.max_epochs=3", "optimizer.lr=3e-3,1e-12", "seed=1,2", "hydra/sweeper=tune",
                       "hydra.sweeper.scheduler=asha", "hydra.sweeper.grace_period=1",
                       "hydra.sweeper.ray.init.address=local", "hydra.sweeper.ray.init.num_gpus=1",
                       "hydra.sweeper.ray.remote.num_gpus=0.5", "hydra.sweeper.ray.remote.num_cpus=0.5",
                       "hydra.sweeper.ray.init.num_cpus=2", "hydra.sweeper.confirm_top_k=1",
                       "hydra.sweeper.confirm_seeds=[3,4]", "hydra.sweeper.grid_order=grid",  # the order above
                       f"hydra.sweep.dir={tmp_path}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    jobs = [read_record(tmp_path / str(n)) for n in range(4)]
    assert [j["overrides"][-2:] for j in jobs] == [["optimizer.lr=0.003", "seed=1"], ["optimizer.lr=0.003", "seed=2"],
                                                  ["optimizer.lr=1e-12", "seed=1"], ["optimizer.lr=1e-12", "seed=2"]]
    # Half a GPU each: every trial on the one device, two of them (CPUs would allow four) at a time, never more.
    every_job = [read_record(tmp_path / str(n)) for n in range(6)]
    assert all(j["launcher"] == "tune" and j["devices"] == "0" for j in every_job), [j["devices"] for j in every_job]
    # each trial holds half the GPU, so data.on_device=auto budgets half its free memory (two trials see it all)
    assert all(j["gpu_share"] == 0.5 for j in every_job), [j.get("gpu_share") for j in every_job]
    assert _most_at_once(every_job) <= 2  # training spans, to the millisecond
    spans = _trial_spans(tmp_path / ".tune")  # whole trial processes (imports too), to the second
    assert spans[1][0] < spans[0][1] - 1, spans  # the first two trials ran side by side
    # The replay (segx.search.replay) makes Ray's own ASHA decisions again, fed the reports in the order ASHA saw them
    from ray.tune.schedulers import ASHAScheduler

    from segx.search.replay import recorded_events, replay_events

    asha = ASHAScheduler(time_attr="epoch", metric="score", mode="max", max_t=3, grace_period=1, reduction_factor=3,
                         stop_last_trials=False)
    decisions = replay_events(asha, recorded_events(tmp_path / ".tune"), 4)
    assert [decisions[n] for n in (2, 3)] == [(1, "STOP"), (1, "STOP")], decisions
    # Which good trial reaches the rung first is the machine's timing: the second may fall under the first's cut-off,
    # as ASHA's rule says. So each good trial's record is checked against what the replayed ASHA decided for it.
    cut = [n for n in (0, 1) if decisions[n] == (1, "STOP")]
    assert len(cut) <= 1, decisions
    for n in (0, 1):
        if n in cut:
            assert (jobs[n]["status"], jobs[n]["stopped_at_epoch"]) == (STOPPED, 1), jobs[n]
        else:  # ASHA judged its every epoch, the last included (where its verdict no longer changes the run)
            assert jobs[n]["status"] == COMPLETED and jobs[n]["epochs"] == 3 and decisions[n][0] == 3, decisions
    for number, weak in enumerate(jobs[2:], 2):
        assert weak["status"] == STOPPED and weak["stopped_at_epoch"] == 1 and weak["stopped_by"] == "ASHA"
        raw = (tmp_path / str(number) / "metrics.json").read_text()
        assert '"status": "stopped"' in raw  # final in the trial's own record, not only through the verdict file
        assert weak["epochs"] == 1 and weak["best"]["val/miou"] >= 0  # its last score is kept
    assert (tmp_path / ".tune").is_dir() and not list(tmp_path.glob("*/tensorboard"))
    # The second stage: the best configuration (lr=3e-3; seed aside) again with seeds 3 and 4, all 3 epochs.
    confirmed = [read_record(tmp_path / str(n)) for n in (4, 5)]
    assert [c["overrides"][-2:] for c in confirmed] == [["optimizer.lr=0.003", "seed=3"],
                                                       ["optimizer.lr=0.003", "seed=4"]]
    assert all(c["status"] == COMPLETED and c["epochs"] == 3 for c in confirmed)
    assert "seed=1" not in confirmed[0]["overrides"]
    assert f"6 jobs, {4 - len(cut)} completed, 0 failed, {2 + len(cut)} stopped early by the scheduler" in output
    best = max((j for j in every_job if j["status"] == COMPLETED), key=lambda j: j["best"]["val/miou"])
    assert f"Best trial: job {every_job.index(best)}, val/miou {best['best']['val/miou']:.4f}" in output
    # In MLflow the stopped trials end KILLED (closed by the search, as Ray Tune ends their processes), the rest
    # FINISHED, each in the run its record names.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = {r.info.run_id: r for r in client.search_runs([client.get_experiment_by_name("asha").experiment_id])}
    assert sorted(runs) == sorted(j["mlflow"]["run_id"] for j in every_job)
    assert [runs[j["mlflow"]["run_id"]].info.status for j in every_job] == [
        "KILLED" if j["status"] == STOPPED else "FINISHED" for j in every_job]
    assert [j["status"] for j in every_job].count(STOPPED) == 2 + len(cut)
    assert [runs[j["mlflow"]["run_id"]].data.tags["segx.status"] for j in every_job[2:4]] == [STOPPED, STOPPED]

    report = write_report(collect_runs(tmp_path), tmp_path / "report", roots=[tmp_path])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "asha** (rungs after epochs 1)" in text and f"{2 + len(cut)} stopped early" in text
    # The cost: 3 + 3 + 1 + 1 epochs of the 4 × 3 the grid would have trained (a good trial cut at its rung trains 1),
    # the confirmation's 6 beside it.
    trained = 8 - 2 * len(cut)
    assert f"{trained} epochs trained of the 12" in text and f"{round(100 * trained / 12)}%" in text
    assert "plus 6 epochs of confirmation" in text
    stopped = text.split("### Stopped early")[1].split("## ")[0]
    assert [line.split(" | ")[2] for line in stopped.splitlines() if line.startswith("| 2 ") or
            line.startswith("| 3 ")] == ["1", "1"]
    assert "Jobs without a result" not in text  # stopped trials are listed once, as stopped
    assert "**Best:** `optimizer.lr=0.003`: val/miou " in text and f"over {4 - len(cut)} completed run(s), 2 of " \
        "them from the confirmation stage" in text
    ranked = report.rows[0]
    assert ranked["settings"]["optimizer.lr"] == "0.003" and ranked["runs"] == 4 - len(cut)  # searched + confirmed
    assert (tmp_path / "report" / "plots" / "search_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_seeded_tpe_search_over_a_mixed_space_runs_the_configurations_its_seed_samples(shapes_root: Path,
                                                                                       tmp_path: Path) -> None:
    """Six Optuna TPE trials over a choice, a log interval and an integer interval, each trained one short epoch;
    the trials are what a fresh searcher with the same seed proposes, and the report plots score against lr."""
    from hydra_plugins.segx_tune_sweeper.tune_sweeper import TuneSweeper
    from segx.report import collect_runs, write_report

    space = ["optimizer=choice(sgd,adam)", "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
             "data.batch_size=int(interval(4, 8))"]
    result = run_sweep(*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "logger=none",
                       "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                       *space, "hydra/sweeper=tune", "hydra.sweeper.search=optuna", "hydra.sweeper.num_samples=6",
                       "hydra.sweeper.seed=7", "hydra.sweeper.scheduler=none", "hydra.sweeper.ray.init.address=local",
                       "hydra.sweeper.ray.init.num_gpus=2", "hydra.sweeper.ray.init.num_cpus=2",
                       f"hydra.sweep.dir={tmp_path / 'search'}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "6 jobs, 6 completed, 0 failed" in output and (tmp_path / "search" / "optuna.journal").is_file()
    assert all(f"(job {n} pid=" in output for n in range(6)), output[-3000:]  # each trial's lines say whose
    # With fewer trials than TPE's 10 random start-up ones, the proposals do not depend on the scores.
    expected = _suggestions(TuneSweeper(search="optuna", num_samples=6, seed=7)._searcher(
        parse_space(space), 6, tmp_path / "fresh"), 6)
    ran = [read_record(tmp_path / "search" / str(n)) for n in range(6)]
    assert all(r["status"] == COMPLETED for r in ran)
    assert [r["overrides"][-3:] for r in ran] == [[f"{k}={t[k]}" for k in ("optimizer", "optimizer.lr",
                                                                          "data.batch_size")] for t in expected]
    # Tune (and Optuna through it) got each trial's one epoch, the run's last, with segx's own score
    told = {}
    for results in (tmp_path / "search" / ".tune").glob("*/result.json"):
        lines = [json.loads(line) for line in results.read_text().splitlines()]
        told[int(lines[0]["config"]["_job"])] = [(line["epoch"], line["score"]) for line in lines]
    assert told == {n: [(1, r["history"][-1]["val/miou"])] for n, r in enumerate(ran)}
    report = write_report(collect_runs(tmp_path / "search"), tmp_path / "report", roots=[tmp_path / "search"])
    figure = next(f for f in report.figures if f.name == "score_vs_parameters.png")
    assert figure.path is not None and "`optimizer.lr`, `data.batch_size`, coloured by `optimizer`" in figure.caption
    assert "optuna search over 6 trials of up to 1 epochs" in (tmp_path / "report" / "report.md").read_text()


def test_the_search_benchmark_reads_a_recorded_grid_and_checks_a_real_search_against_the_replay(
        tmp_path: Path) -> None:
    import json

    from segx.bench.search import sweep_outcome, within_replay
    from segx.runs.discovery import find_runs
    from segx.search.replay import grid_from_runs

    def write(sweep: str, job: int, status: str, curve: list[float], overrides: list[str]) -> None:
        run_dir = tmp_path / sweep / str(job)
        run_dir.mkdir(parents=True)
        record = {"status": status, "epochs": len(curve), "monitor": "val/miou", "overrides": overrides,
                  "history": [{"epoch": float(e), "val/miou": v} for e, v in enumerate(curve)],
                  "best": {"val/miou": max(curve)}}
        (run_dir / "metrics.json").write_text(json.dumps(record))

    curves = {"optimizer.lr=0.1": [0.1, 0.2, 0.3, 0.4], "optimizer.lr=0.01": [0.3, 0.35, 0.36, 0.37],
              "optimizer.lr=0.001": [0.05, 0.1, 0.15, 0.2]}
    job = 0
    for setting, curve in curves.items():
        for seed in (1, 2):
            write("grid", job, COMPLETED, [v + 0.01 * seed for v in curve], [setting, f"seed={seed}"])
            job += 1
    write("grid", job, FAILED, [0.9], ["optimizer.lr=1", "seed=1"])  # no finished curve: left out
    grid = grid_from_runs(find_runs([tmp_path / "grid"]), "val/miou")
    assert grid is not None and grid.configs == sorted(curves) and grid.seeds == ["1", "2"] and grid.max_t == 4
    assert grid.best_config() == "optimizer.lr=0.1" and grid.noise() == pytest.approx(0.01 / 2 ** 0.5)
    # The real search under sha (rungs after epoch 2, keeping 1 of 3): lr=0.01 leads at epoch 2 and trains on.
    write("sha", 0, COMPLETED, [0.31, 0.36, 0.37, 0.38], ["optimizer.lr=0.01", "seed=1"])
    write("sha", 1, STOPPED, [0.11, 0.21], ["optimizer.lr=0.1", "seed=1"])
    write("sha", 2, STOPPED, [0.06, 0.11], ["optimizer.lr=0.001", "seed=1"])
    (tmp_path / "sha" / ".tune").mkdir()  # Tune's own folder is no trial
    outcome = sweep_outcome(tmp_path / "sha")
    assert (outcome["epochs"], outcome["winner"], outcome["stopped"]) == (8, ["optimizer.lr=0.01"], 2)
    assert outcome["best"] == pytest.approx(0.38)
    check = within_replay(grid, "sha", {**outcome, "fraction": 8 / 12}, orders=20)
    assert check["fraction_within"] and check["winner_within"] and check["replay_winners"] == ["optimizer.lr=0.01"]
    assert check["winner"] == "optimizer.lr=0.01"
    assert not within_replay(grid, "sha", {**outcome, "fraction": 1.0}, orders=20)["fraction_within"]


def test_a_search_report_plots_score_against_a_log_sampled_parameter_coloured_by_optimizer(tmp_path: Path) -> None:
    """Six TPE-like trials (lr sampled on a log scale, optimizer a choice), two of them stopped: written as the tune
    sweeper would, then reported."""
    import json

    from segx.report import collect_runs, write_report
    from segx.search.plan import SearchPlan, write_plan

    trials = [("adam", 3e-4, COMPLETED, 4), ("sgd", 1e-2, COMPLETED, 4), ("adam", 2e-5, STOPPED, 1),
              ("sgd", 5e-5, STOPPED, 2), ("adam", 1e-3, COMPLETED, 4), ("sgd", 2e-3, COMPLETED, 4)]
    for job, (optimizer, lr, status, epochs) in enumerate(trials):
        history = [{"epoch": e, "val/miou": 0.1 * (e + 1) * (1 + job % 3)} for e in range(epochs)]
        record = {"status": status, "epochs": epochs, "monitor": "val/miou", "history": history,
                  "best": dict(history[-1]), "overrides": [f"optimizer={optimizer}", f"optimizer.lr={lr}"],
                  **({"stopped_at_epoch": epochs, "stopped_by": "ASHA"} if status == STOPPED else {})}
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(record))
    write_plan(tmp_path, SearchPlan(search="optuna", scheduler="asha", trials=6, max_t=4, grace_period=1,
                                    reduction_factor=2, parameters={"optimizer": "choice",
                                                                    "optimizer.lr": "loguniform"}))
    report = write_report(collect_runs(tmp_path), tmp_path / "report", roots=[tmp_path])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "optuna search over 6 trials of up to 4 epochs" in text and "(rungs after epochs 1, 2)" in text
    assert "19 epochs trained of the 24" in text and "79%" in text
    figure = next(f for f in report.figures if f.name == "score_vs_parameters.png")
    assert figure.path is not None and figure.path.stat().st_size > 10_000, figure.skipped
    assert "`optimizer.lr`, coloured by `optimizer`" in figure.caption
    stopped = text.split("### Stopped early")[1].split("## ")[0]
    assert stopped.index("| 2 |") < stopped.index("| 3 |")  # by last score: job 2's 30% above job 3's 20%
    assert "| 3 | optimizer=sgd optimizer.lr=5e-05 | 2 | 20.00 | 20.00 |" in stopped


def test_a_grid_search_plots_score_against_a_comma_listed_learning_rate(tmp_path: Path) -> None:
    """`optimizer.lr=0.01,0.1` under the tune sweeper: two listed values are a numeric axis, not a category."""
    import json

    from segx.report import collect_runs, write_report
    from segx.search.plan import SearchPlan, write_plan

    for job, (optimizer, lr) in enumerate((("sgd", 0.01), ("sgd", 0.1), ("adam", 0.01), ("adam", 0.1))):
        history = [{"epoch": e, "val/miou": 0.1 * (e + 1) + lr} for e in range(2)]
        record = {"status": COMPLETED, "epochs": 2, "monitor": "val/miou", "history": history,
                  "best": dict(history[-1]), "overrides": [f"optimizer={optimizer}", f"optimizer.lr={lr}"]}
        (tmp_path / str(job)).mkdir()
        (tmp_path / str(job) / "metrics.json").write_text(json.dumps(record))
    write_plan(tmp_path, SearchPlan(search="grid", scheduler="none", trials=4, max_t=2,
                                    parameters={"optimizer": "grid", "optimizer.lr": "grid"}))
    report = write_report(collect_runs(tmp_path), tmp_path / "report", roots=[tmp_path])
    figure = next(f for f in report.figures if f.name == "score_vs_parameters.png")
    assert figure.path is not None and figure.skipped is None
    assert "against `optimizer.lr`, coloured by `optimizer`" in figure.caption
