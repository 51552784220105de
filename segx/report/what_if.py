"""The report's "what if" section for a finished grid: what successive halving and ASHA at the tune sweeper's defaults
would have trained, and whether they would have found the same winner, replayed on the grid's own curves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segx.report import plots
from segx.report.figures import PLOT_DIR, Figure, _draw
from segx.report.runs import Run
from segx.runs.status import COMPLETED
from segx.search.replay import DEFAULT_SCHEDULERS, Grid, grid_from_runs, replay_table

PLOT_FILE = "what_if.png"
ORDERS = 200  # trial orders per seed; fewer for a large grid, so a report stays quick
SIMULATED_EPOCHS = 200_000  # per scheduler: orders × seeds × configurations × epochs stay below it
SCHEDULERS = ("sha", "asha")  # at the tune sweeper's defaults
MIN_CONFIGS, MIN_EPOCHS = 4, 3  # a smaller grid has nothing to halve


@dataclass
class WhatIf:
    """The replay of a finished grid: one row per scheduler (segx.search.replay.Summary.row)."""

    grid: Grid
    rows: list[dict[str, Any]]
    orders: int  # trial orders per seed


def what_if(runs: Sequence[Run], monitor: str) -> WhatIf | None:
    """The replay for a grid whose every job completed at the same length; None for anything else (a search that
    stopped trials, runs still going, a grid too small to halve)."""
    if not runs or any(r.status != COMPLETED for r in runs):
        return None
    grid = grid_from_runs(runs, monitor)
    if grid is None or len(grid.configs) < MIN_CONFIGS or grid.max_t < MIN_EPOCHS:
        return None
    chosen = {name: DEFAULT_SCHEDULERS[name] for name in SCHEDULERS}
    orders = orders_for(grid)
    return WhatIf(grid, replay_table(grid, chosen, workers=(1,), orders=orders), orders)


def orders_for(grid: Grid) -> int:
    """ORDERS, or fewer (at least 20) where a grid is so large that they would simulate over SIMULATED_EPOCHS."""
    size = len(grid.configs) * grid.max_t * len(grid.seeds)
    return max(20, min(ORDERS, SIMULATED_EPOCHS // size))


def write(runs: Sequence[Run], out_dir: Path, monitor: str) -> tuple[list[str], Figure | None]:
    """report.md's section and plots/what_if.png; nothing (and an earlier report's figure removed) where there is no
    finished grid."""
    result = what_if(runs, monitor)
    if result is None:
        (out_dir / PLOT_DIR / PLOT_FILE).unlink(missing_ok=True)
        return [], None
    grid = result.grid
    caption = (f"Each scheduler replayed on this grid's curves over {result.orders} trial orders × {len(grid.seeds)} "
               "seed(s): the share of the grid's epochs it would have trained (median, bar to the 90th percentile) "
               "and how often its pick would have scored within noise of the grid's best (P(regret ≤ noise), bar: 95% "
               "Wilson interval; diamond: how often it picks the grid's own winner).")
    drawn = _draw(Figure(PLOT_FILE, "What if a scheduler had run this grid", caption), out_dir,
                  lambda p: plots.what_if(result.rows, p))
    return section(result, drawn, out_dir, monitor), drawn


def section(result: WhatIf, drawn: Figure | None, out_dir: Path, monitor: str) -> list[str]:
    grid = result.grid
    seeds = len(grid.seeds)
    defaults = DEFAULT_SCHEDULERS["sha"]
    noise = (f"the seed spread of the best configuration (`{grid.best_config()}`, std of its best {monitor} over "
             f"{seeds} seeds: {100 * grid.noise():.2f} points)" if seeds > 1 else
             "0 (one seed per configuration: the same winner or not)")
    lines = ["## What if a scheduler had run this grid", "",
             f"This grid trained every one of its {len(grid.configs)} configurations for all {grid.max_t} epochs. "
             "Replayed on its recorded curves (`segx.search.replay`, one trial at a time, "
             f"{result.orders} trial orders per seed), the tune sweeper's schedulers at their defaults "
             f"(grace_period {defaults['grace_period']}, reduction_factor {defaults['reduction_factor']}) would have "
             "trained, and found:", "",
             "| scheduler | epochs trained (median) | 90th percentile | same winner | P(regret ≤ noise) "
             "| 95% interval |",
             "|---|---|---|---|---|---|"]
    for row in result.rows:
        lines.append(f"| `{row['scheduler']}` | {row['fraction_median']:.0%} | {row['fraction_p90']:.0%} | "
                     f"{row['p_same_winner']:.0%} | {row['p_regret_le_noise']:.0%} | "
                     f"{row['p_low']:.0%}–{row['p_high']:.0%} |")
    lines += ["", f"Regret: the grid's best {monitor} less that of the configuration the scheduler would have "
              f"picked, per seed; noise: {noise}. Pick the next sweep's scheduler with "
              "`hydra/sweeper=tune hydra.sweeper.scheduler=sha` (or `asha`).", ""]
    if drawn is not None and drawn.path is not None:
        lines += [f"![{drawn.title}]({drawn.path.relative_to(out_dir).as_posix()})", "", drawn.caption, ""]
    elif drawn is not None:
        lines += [f"Figure not drawn: {drawn.skipped}.", ""]
    return lines
