"""What a search scheduler saves and what it risks: the bench grid recorded once, every configuration with 3 seeds
at full length; the schedulers replayed on those curves over many trial orders (segx.search.replay); and one real
search per scheduler, whose cost and winner must fall inside the replay's range."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from segx.runs.discovery import find_runs
from segx.runs.record import DEFAULT_MONITOR, best_value
from segx.runs.status import STOPPED
from segx.search.replay import DEFAULT_SCHEDULERS, Grid, factory, grid_from_runs, replay, replay_table

LEARNING_RATES = ("1e-4", "3e-4", "1e-3", "3e-3", "1e-2", "3e-2")
OPTIMIZERS = ("sgd", "adam")  # 6 × 2 = 12 configurations
SEEDS = (1, 2, 3)
REAL_WORKERS = 2  # trials at once in the real searches (the replay they are checked against uses the same); the
# recording runs as many at once as the CPUs allow: its curves do not depend on the order
SWEEPER_KINDS = ("sha", "asha", "hyperband")  # the replay's schedulers the tune sweeper can run for real


def sweeper_overrides(name: str) -> list[str]:
    """The tune sweeper's settings of the replay's scheduler `name` (DEFAULT_SCHEDULERS), to run it end to end."""
    arguments = DEFAULT_SCHEDULERS[name]
    if arguments["kind"] not in SWEEPER_KINDS:
        raise ValueError(f"{name} runs in the replay only; a real search takes one of {', '.join(SWEEPER_KINDS)}")
    overrides = [f"hydra.sweeper.scheduler={arguments['kind']}"]
    overrides += [f"hydra.sweeper.{key}={arguments[key]}" for key in ("grace_period", "reduction_factor")
                  if key in arguments]
    if arguments.get("rungs"):
        overrides.append(f"hydra.sweeper.rungs=[{','.join(map(str, arguments['rungs']))}]")
    return overrides

def grid_overrides(sweep_dir: Path, data_root: Path, epochs: int, size: int, seeds: tuple[int, ...]) -> list[str]:
    """The benchmark's grid on generated shapes: a narrow U-Net, 12 configurations, each with `seeds`."""
    return ["-m", "hydra/sweeper=tune", f"hydra.sweep.dir={sweep_dir}", f"optimizer={','.join(OPTIMIZERS)}",
            f"optimizer.lr={','.join(LEARNING_RATES)}", f"seed={','.join(map(str, seeds))}",
            "model=unet_small", "model.encoder_widths=[16,32]", "model.bottleneck_width=64", "data=shapes",
            f"data.root={data_root}", "data.num_train=96", "data.num_val=32", f"data.image_size={size}",
            "data.batch_size=8", f"trainer.max_epochs={epochs}", "trainer.enable_progress_bar=false", "logger=none",
            "callbacks.prediction_grid=null", "hydra.sweeper.ray.remote.num_gpus=0",
            "hydra.sweeper.ray.remote.num_cpus=1"]


def _sweep(overrides: list[str], what: str) -> None:
    command = [sys.executable, "-m", "segx.cli.train", *overrides]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def sweep_outcome(sweep_dir: Path) -> dict[str, Any]:
    """Epochs trained in all, the best monitored score, and the settings (less the seed) of the best trial."""
    runs = find_runs([sweep_dir])
    scored = [(best_value(r.record, str(r.record.get("monitor", DEFAULT_MONITOR))), r) for r in runs]
    scored = [(s, r) for s, r in scored if not math.isnan(s)]
    best = max(scored, key=lambda item: item[0], default=(float("nan"), None))
    winner = [o for o in (best[1].record.get("overrides") or []) if not o.startswith("seed=")] \
        if best[1] is not None else []
    return {"trials": len(runs), "epochs": sum(int(r.record.get("epochs") or 0) for r in runs), "best": best[0],
            "winner": winner, "stopped": sum(r.status == STOPPED for r in runs)}


def record_grid(workdir: Path, epochs: int = 12, size: int = 32) -> Grid:
    """The bench grid with every seed at full length (scheduler none); an earlier complete recording is reused (the
    same command skips finished trials)."""
    sweep_dir = workdir / "search-grid"
    _sweep([*grid_overrides(sweep_dir, workdir / "search-shapes", epochs, size, SEEDS),
            "hydra.sweeper.scheduler=none"], "recording of the bench grid")
    grid = grid_from_runs(find_runs([sweep_dir]), DEFAULT_MONITOR)
    if grid is None or len(grid.configs) != len(OPTIMIZERS) * len(LEARNING_RATES) or len(grid.seeds) != len(SEEDS):
        raise RuntimeError(f"{sweep_dir} does not hold every configuration with every seed at {epochs} epochs")
    return grid


def real_search(workdir: Path, name: str, epochs: int, size: int) -> dict[str, Any]:
    """One search of the grid with seed 1 under the replay's scheduler `name`, end to end."""
    sweep_dir = workdir / f"search-{name.replace(' ', '-')}"
    _sweep([*grid_overrides(sweep_dir, workdir / "search-shapes", epochs, size, (1,)), *sweeper_overrides(name),
            f"hydra.sweeper.max_concurrent_trials={REAL_WORKERS}"], f"{name} search")
    outcome = sweep_outcome(sweep_dir)
    outcome["fraction"] = outcome["epochs"] / (outcome["trials"] * epochs) if outcome["trials"] else None
    return outcome


def within_replay(grid: Grid, name: str, real: dict[str, Any], orders: int) -> dict[str, Any]:
    """Does the real search's epoch fraction lie within the replay's range (seed 1, REAL_WORKERS at once), and is its
    winner one the replay found in some order?"""
    seed_one = Grid({c: {"1": by_seed["1"]} for c, by_seed in grid.curves.items()}, grid.max_t)
    summary = replay(seed_one, name, factory(**DEFAULT_SCHEDULERS[name]), REAL_WORKERS, orders)
    low, high = min(summary.fractions), max(summary.fractions)
    winners = sorted(set(summary.found))
    # the grid keys a configuration by its varied overrides; the real search's winner holds them among all of its own
    found = next((w for w in winners if set(w.split()) <= set(real["winner"])), None)
    return {"fraction": real["fraction"], "replay_fraction_range": [low, high],
            "fraction_within": low - 1e-9 <= real["fraction"] <= high + 1e-9, "winner": found or
            " ".join(real["winner"]), "replay_winners": winners, "winner_within": found is not None}


def search_bench(workdir: Path, epochs: int = 12, size: int = 32, orders: int = 200,
                 real: tuple[str, ...] = ("sha", "asha"), say: Any = print) -> dict[str, Any]:
    """The whole bench: record, replay every scheduler with 1 and 4 trials at once, run the real searches."""
    start = time.perf_counter()
    say(f"  recording the grid: {len(OPTIMIZERS) * len(LEARNING_RATES)} configurations × {len(SEEDS)} seeds × "
        f"{epochs} epochs ...")
    grid = record_grid(workdir, epochs, size)
    recorded = time.perf_counter() - start
    say(f"  recorded in {recorded:.0f}s; best configuration `{grid.best_config()}`, seed spread {grid.noise():.4f}")
    rows = replay_table(grid, workers=(1, 4), orders=orders)
    replayed = time.perf_counter() - start - recorded
    say(f"  replayed over {orders} orders × seeds {', '.join(grid.seeds)} in {replayed:.0f}s:")
    for line in table_lines(rows):
        say(line)
    checks = {}
    for name in real:
        say(f"  a real {name} search ...")
        checks[name] = within_replay(grid, name, real_search(workdir, name, epochs, size), orders)
        low, high = checks[name]["replay_fraction_range"]
        say(f"  real {name}: epoch fraction {checks[name]['fraction']:.2f} (replay {low:.2f}–{high:.2f}: "
            f"{'inside' if checks[name]['fraction_within'] else 'OUTSIDE'}), winner `{checks[name]['winner']}` "
            f"({'one the replay found' if checks[name]['winner_within'] else 'NOT one the replay found'})")
    sha = next(r for r in rows if r["scheduler"] == "sha" and r["workers"] == 1)
    return {"search_epoch_fraction": sha["fraction_median"], "search_p_regret_le_noise": sha["p_regret_le_noise"],
            "rows": rows, "real": checks, "noise": grid.noise(), "best_config": grid.best_config(),
            "orders": orders, "seeds": list(grid.seeds), "seconds": {"record": recorded, "replay": replayed,
                                                                     "total": time.perf_counter() - start}}


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The replay table as aligned text lines."""
    lines = [f"  {'scheduler':<22}{'at once':>8}{'epochs median':>15}{'p90':>7}{'P(regret<=noise)':>18}"
             f"{'95% interval':>16}{'same winner':>13}"]
    for r in rows:
        interval = f"[{r['p_low']:.2f}, {r['p_high']:.2f}]"
        lines.append(f"  {r['scheduler']:<22}{r['workers']:>8}{r['fraction_median']:>15.2f}{r['fraction_p90']:>7.2f}"
                     f"{r['p_regret_le_noise']:>18.2f}{interval:>16}{r['p_same_winner']:>13.2f}")
    return lines
