"""What a report adds for a search (a sweep directory with search.json): its stages, the cost against the full
grid, and the trials the scheduler stopped with the epoch each reached."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segx.report.runs import Configuration, Run
from segx.runs.status import COMPLETED, STOPPED
from segx.search.plan import SearchPlan, read_plan


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def job_number(run: Run) -> int | None:
    """The job number a sweep gave the run (its directory's name), None for a run outside a sweep."""
    return int(run.run_dir.name) if run.run_dir.name.isdigit() else None


def epochs_trained(run: Run) -> int:
    """Epochs the run trained: its record's count, else its history's length."""
    epochs = run.record.get("epochs")
    return int(epochs) if isinstance(epochs, int | float) else len(run.history)


def last_score(run: Run) -> float | None:
    """The monitored score of the run's last recorded epoch."""
    for entry in reversed(run.history):
        value = entry.get(run.monitor)
        if isinstance(value, int | float) and value == value:
            return float(value)
    return None


@dataclass
class Search:
    """A search's plan and its runs split into the two stages."""

    plan: SearchPlan
    root: Path
    trials: list[Run]  # the search stage
    confirmations: list[Run]  # the confirmation stage

    @property
    def stopped(self) -> list[Run]:
        return [r for r in self.trials if r.status == STOPPED]

    @property
    def epochs(self) -> int:
        return sum(epochs_trained(r) for r in self.trials)

    @property
    def full_epochs(self) -> int:
        """What the same trials would have trained without early stopping."""
        return self.plan.trials * self.plan.max_t

    @property
    def cost(self) -> float | None:
        return self.epochs / self.full_epochs if self.full_epochs else None


def find_search(runs: Sequence[Run], roots: Sequence[Path]) -> Search | None:
    """The search under the first root that holds a search.json, with its runs; None for a plain sweep."""
    for root in roots:
        plan = read_plan(root)
        if plan is None:
            continue
        mine = [r for r in runs if r.run_dir.parent.resolve() == root.resolve() and job_number(r) is not None]
        confirm = set(plan.confirm_jobs)
        return Search(plan=plan, root=root, trials=[r for r in mine if job_number(r) not in confirm],
                      confirmations=[r for r in mine if job_number(r) in confirm])
    return None


def _settings(run: Run, keys: Sequence[str]) -> str:
    return " ".join(f"{k}={run.settings[k]}" for k in keys if k in run.settings) or run.run_dir.name


def _best_line(search: Search, configs: Sequence[Configuration]) -> list[str]:
    """The best configuration by mean over its completed seeds, and whether the confirmation stage trained it."""
    best = next((c for c in configs if c.mean(c.monitor) is not None), None)
    if best is None:
        return []
    values = best.best_values(best.monitor)
    spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
    confirmed = [r for r in best.runs if r in search.confirmations]
    how = (f", {len(confirmed)} of them from the confirmation stage" if confirmed else
           " (not confirmed: hydra.sweeper.confirm_top_k=0 trains no other seeds)")
    return [f"**Best:** `{best.label}`: {best.monitor} {100 * statistics.fmean(values):.2f}{spread}% over "
            f"{len(values)} completed run(s){how}.", ""]


def search_markdown(search: Search, keys: Sequence[str], configs: Sequence[Configuration] = ()) -> list[str]:
    """The report's "Search" section: what ran, what it cost, the best configuration and the stopped trials."""
    plan = search.plan
    completed = sum(r.status == COMPLETED for r in search.trials)
    rungs = ", ".join(f"{r:g}" for r in plan.rungs)
    lines = ["## Search", "",
             f"{plan.search} search over {plan.trials} trials of up to {plan.max_t} epochs, scheduler "
             f"**{plan.scheduler}**" + (f" (rungs after epochs {rungs})" if rungs else "") + f": {completed} trained "
             f"to the end, {len(search.stopped)} stopped early, "
             f"{sum(r.ended_badly for r in search.trials)} failed.", ""]
    if search.cost is not None:
        lines += [f"**Cost:** {search.epochs} epochs trained of the {search.full_epochs} the same {plan.trials} "
                  f"trials would have trained to the end: **{100 * search.cost:.0f}%**"
                  + (f", plus {sum(epochs_trained(r) for r in search.confirmations)} epochs of confirmation."
                     if search.confirmations else "."), ""]
    if plan.confirm_jobs:
        seeds = ", ".join(str(s) for s in plan.confirm_seeds)
        lines += [f"**Confirmation:** the best {len(plan.confirm_jobs) // max(1, len(plan.confirm_seeds))} "
                  f"configuration(s) trained again to the end with seeds {seeds} (jobs {min(plan.confirm_jobs)}–"
                  f"{max(plan.confirm_jobs)}); the ranking below averages them with the search's completed seeds, "
                  "so confirmed configurations are compared like with like.", ""]
    lines += _best_line(search, configs)
    if search.stopped:
        lines += ["### Stopped early", "", "Ranked by their last score; a stopped trial is not in the ranking's means.",
                  "", "| job | configuration | stopped after epoch | last score % | best so far % |",
                  "|---|---|---:|---:|---:|"]
        for run in sorted(search.stopped, key=lambda r: -(last_score(r) or -1.0)):
            best = run.best_value(run.monitor)
            cells = [run.run_dir.name, _settings(run, keys), str(run.record.get("stopped_at_epoch", "?")),
                     _pct(last_score(run)), _pct(best)]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return lines


def _numeric(values: Sequence[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def continuous_keys(search: Search, keys: Sequence[str]) -> list[str]:
    """Varied numeric parameters, each worth a score-against-value plot: sampled intervals, and listed values (a
    comma-listed `optimizer.lr=0.01,0.1` too) once they take two values or more."""
    chosen = []
    for key in keys:
        values = [r.settings[key] for r in search.trials if key in r.settings]
        numbers = _numeric(values)
        if numbers is None or key == "seed":
            continue
        if search.plan.parameters.get(key) in ("uniform", "loguniform") or len(set(numbers)) >= 2:
            chosen.append(key)
    return chosen


def colour_key(search: Search, keys: Sequence[str]) -> str | None:
    """The first varied non-numeric parameter (e.g. optimizer), which colours the score-against-value plot."""
    for key in keys:
        values = [r.settings[key] for r in search.trials if key in r.settings]
        if values and _numeric(values) is None and len(set(values)) > 1:
            return key
    return None


def log_scaled(search: Search, key: str) -> bool:
    """Log-sampled, or positive values spanning two decades or more."""
    if key in search.plan.log_scale:
        return True
    numbers = _numeric([r.settings[key] for r in search.trials if key in r.settings]) or []
    return bool(numbers) and min(numbers) > 0 and max(numbers) / min(numbers) >= 100


def trial_points(search: Search, key: str) -> list[dict[str, Any]]:
    """Each trial's value of `key`, its best score so far and whether it ran to the end."""
    points = []
    for run in search.trials:
        score = run.best_value(run.monitor)
        if key in run.settings and score is not None and run.status in (COMPLETED, STOPPED):
            points.append({"value": float(run.settings[key]), "score": score, "completed": run.completed,
                           "run": run})
    return points
