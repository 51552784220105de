"""report.md: what was compared, the ranked table (and each model's best lr), jobs without a result, the figures."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from segx.report.figures import Figure
from segx.report.runs import Configuration, Run, common_overrides, varying_keys
from segx.report.search import Search, search_markdown
from segx.report.tables import STUDY_FOOTNOTE, STUDY_HEADERS, STUDY_METRICS, lr_keys, markdown_table, tuned_per_model
from segx.runs.record import lost_attempts
from segx.runs.status import STOPPED


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "—"


def _job_name(run: Run, roots: Sequence[Path]) -> str:
    for root in roots:
        try:
            return run.run_dir.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            continue
    return run.run_dir.name


def _unfinished(runs: list[Run], roots: Sequence[Path], listed: Sequence[Run] = ()) -> list[str]:
    unfinished = [r for r in runs if not r.completed and r not in listed]
    if not unfinished:
        return []
    lines = ["## Jobs without a result", "", "| job | status | run directory | why (first line of the error) |",
             "|---|---|---|---|"]
    for run in unfinished:
        cells = [_job_name(run, roots), run.status, f"`{run.run_dir}`", run.reason]
        lines.append("| " + " | ".join(_escape(c) for c in cells) + " |")
    return [*lines, ""]


def _partial_best(runs: list[Run], roots: Sequence[Path]) -> list[str]:
    """A note under the ranking naming the jobs whose best epoch was cut short (trainer.max_time): their scores
    come from fewer batches than a whole epoch, so their rank may not hold."""
    partial = [r for r in runs if r.completed and r.best.get("partial")]
    if not partial:
        return []
    jobs = ", ".join(f"{_job_name(r, roots)} ({r.best.get('train_batches', '?')} batches)" for r in partial)
    return [f"**Partial best epochs:** the best epoch of job{'s' if len(partial) > 1 else ''} {_escape(jobs)} was "
            "cut short by `trainer.max_time` and trained fewer batches than a whole epoch.", ""]


def _figures(figures: list[Figure], out_dir: Path) -> list[str]:
    lines = ["## Figures", ""]
    for figure in figures:
        lines += [f"### {figure.title}", ""]
        if figure.path is not None:
            link = figure.path.relative_to(out_dir).as_posix()
            lines += [f"![{figure.title}]({link})", "", figure.caption, ""]
        else:
            lines += [f"Not drawn: {figure.skipped}.", ""]
    return lines


def _typed(overrides: Sequence[str]) -> list[str]:
    """A run's overrides as its command line had them (`+` kept, `data.root` included), less Hydra's own."""
    return [str(o) for o in overrides if not str(o).lstrip("+~").startswith("hydra.")]


def _sweep_overrides(runs: Sequence[Run]) -> list[str]:
    """The typed overrides every run shares (in the first run's order), then each other key with every value the
    runs gave it (`key=a,b`), in run order."""
    typed = [_typed(run.overrides) for run in runs]  # each run's overrides read once
    shared = [o for o in (typed[0] if typed else []) if all(o in others for others in typed[1:])]
    varying: dict[str, list[str]] = {}
    for overrides in typed:
        for override in overrides:
            if override not in shared:
                key, _, value = override.partition("=")
                values = varying.setdefault(key, [])
                if value not in values:
                    values.append(value)
    return [*shared, *(f"{key}={','.join(values)}" for key, values in varying.items())]


def _pasteable(overrides: Sequence[str], lead: str, sweep: bool = False) -> list[str]:
    """A `python train.py ...` line to paste into a shell, each override quoted where the shell needs it."""
    if not overrides:
        return []
    command = "python train.py -m " if sweep else "python train.py "
    return [lead, "", "```bash", command + " ".join(shlex.quote(o) for o in overrides), "```"]


def _stamp() -> str:
    return f"Written by `python -m segx.report` at {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"


def sweep_markdown(rows: list[dict[str, Any]], configs: list[Configuration], runs: list[Run],
                   figures: list[Figure], out_dir: Path, roots: Sequence[Path], over: str = "seed",
                   search: Search | None = None, study: Sequence[str] = ()) -> str:
    """The report of several runs: configurations ranked by the mean over seeds of their monitored score; a
    search's stages, cost and stopped trials before the ranking; the study's points (`study`: lines of markdown)
    after it, where some runs were chained trials."""
    keys = varying_keys(runs, over)
    completed = sum(r.completed for r in runs)
    failed = sum(r.ended_badly for r in runs)
    stopped = sum(r.status == STOPPED for r in runs)  # by a search's scheduler: scores so far, not a failure
    retried = sum(lost_attempts(r.record) > 0 for r in runs)
    monitors = sorted({c.monitor for c in configs})
    monitor_names = ", ".join(f"`{m}`" for m in monitors)
    lines = [f"# Sweep report: {', '.join(f'`{r}`' for r in roots)}", "",
             f"{_stamp()} from {len(runs)} jobs in {len(configs)} configurations: {completed} completed, "
             f"{stopped} stopped early by the search's scheduler, {failed} failed, "
             f"{len(runs) - completed - failed - stopped} running"
             + (f"; {retried} of them retried after a lost worker (each attempt is listed under `attempts` in its "
                "metrics.json)." if retried else "."), "",
             f"Each job's scores are those of its best epoch, the one its monitor ({monitor_names}) picked. "
             "A configuration's mean, max and std (sample standard deviation) are over its completed jobs, which "
             f"differ only by `{over}`; configurations are ranked by the mean, with the max beside it (the study "
             "reported the max over 3 runs). Scores are in percent here and fractions in `report.csv`; `runs` counts "
             "completed jobs, `failed` those that failed or left no readable metrics.json.", ""]
    shared = common_overrides(runs)
    if shared:
        lines += ["## Settings shared by every job", "", " ".join(f"`{_escape(o)}`" for o in shared), "",
                  *_pasteable(_sweep_overrides(runs), "The sweep as typed (`+` kept, `data.root` included):",
                              sweep=True), ""]
    if search is not None:
        lines += search_markdown(search, keys, configs)
    lines += [f"## Configurations ranked by {' / '.join(monitors)}", "", markdown_table(rows, keys), "",
              *_partial_best(runs, roots)]
    tuned = tuned_per_model(rows, keys)
    if tuned:
        lrs = lr_keys(keys)
        others = [k for k in keys if k != "model" and k not in lrs]
        lines += ["## Tuned per model", "",
                  f"Each model at its best {' / '.join(f'`{k}`' for k in lrs)} by mean {' / '.join(monitors)} (the "
                  "study's method: the learning rate tuned for each model, then the models compared).", "",
                  markdown_table(tuned, ["model", *others, *lrs]), ""]
    lines += [*study, *_unfinished(runs, roots, search.stopped if search else ()), *_label_census(runs, roots),
              *_figures(figures, out_dir)]
    return "\n".join(lines).rstrip() + "\n"


def _scores_table(run: Run) -> list[str]:
    """The best and the final epoch's scores; the study's Keras metrics in columns of their own, where recorded."""
    entries = [(label, entry) for label, entry in (("best", run.best), ("final", run.record.get("final") or {}))
               if isinstance(entry, dict) and entry]
    study = [name for name, metric in STUDY_METRICS.items() if any(metric in entry for _, entry in entries)]
    header = ["epoch", "val/miou %", "val/miou_no_bg %", "val/acc %", *(f"{STUDY_HEADERS[n]} %" for n in study),
              "val/loss", "train/loss", "train/acc %"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, entry in entries:
        epoch = entry.get("epoch")
        batches = entry.get("train_batches")
        partial = f", partial: {batches} batch{'' if batches == 1 else 'es'}" if entry.get("partial") else ""
        number = f" ({int(epoch) + 1}{partial})" if isinstance(epoch, int | float) else ""
        loss, train_loss = entry.get("val/loss"), entry.get("train/loss")
        cells = [f"{label}{number}", _pct(entry.get("val/miou")), _pct(entry.get("val/miou_no_bg")),
                 _pct(entry.get("val/acc")), *(_pct(entry.get(STUDY_METRICS[n])) for n in study),
                 f"{loss:.4f}" if isinstance(loss, int | float) else "—",
                 f"{train_loss:.4f}" if isinstance(train_loss, int | float) else "—", _pct(entry.get("train/acc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, *(["", STUDY_FOOTNOTE] if study else [])]


def _label_census(runs: Sequence[Run], roots: Sequence[Path] = ()) -> list[str]:
    """The label census (pixels per class and ignored, per split) each distinct dataset of `runs` trained on, from
    metrics.json's `label_census`; the jobs it belongs to when the runs saw more than one."""
    groups: dict[str, tuple[dict, list[Run]]] = {}
    for run in runs:
        census = run.record.get("label_census")
        if isinstance(census, dict) and census:
            key = repr(sorted((split, sorted(counts.items())) for split, counts in census.items()))
            groups.setdefault(key, (census, []))[1].append(run)
    lines = []
    for census, members in groups.values():
        splits = list(census)
        names = list(dict.fromkeys(name for split in splits for name in census[split]))
        totals = {split: sum(census[split].values()) or 1 for split in splits}
        title = "## Label census" if len(groups) == 1 else \
            f"## Label census of {', '.join(_job_name(r, roots) for r in members[:5])}" \
            f"{' and more' if len(members) > 5 else ''}"
        lines += [title, "", "Pixels of each class in the mask files, at their own size, after `data.label_map`; "
                  "`ignored` are pixels of the ignore index, never scored.", "",
                  "| class | " + " | ".join(f"{_escape(s)} pixels | {_escape(s)} %" for s in splits) + " |",
                  "|---|" + "---:|---:|" * len(splits)]
        for name in names:
            cells = []
            for split in splits:
                pixels = census[split].get(name, 0)
                cells += [f"{pixels:,}", f"{100 * pixels / totals[split]:.1f}"]
            lines.append(f"| {_escape(name)} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def run_markdown(run: Run, figures: list[Figure], out_dir: Path, study: Sequence[str] = ()) -> str:
    """The report of one run: its settings, scores at the best and the final epoch, IoU per class, the study's
    points (`study`: lines of markdown, for a chained-trials run), figures."""
    record = run.record
    epochs = record.get("epochs") or len(run.history) or "?"
    lines = [f"# Run report: `{run.run_dir}`", "",
             f"{_stamp()}. Status: **{run.status}**"
             + (f" ({_escape(run.reason)})" if run.reason else "")
             + f"; {epochs} epochs; host {record.get('host', '?')}, devices {record.get('devices', '?')}, precision "
               f"{record.get('precision', '?')}; started {record.get('started_at', '?')}, ended "
               f"{record.get('ended_at', '—')}.", ""]
    attempts = record.get("attempts") or []
    if len(attempts) > 1:  # resumed: after a lost worker, a pause at a search's rung, or an interruption
        lines += [f"Trained in {len(attempts)} attempts:", "",
                  *(f"{n}. from epoch {a.get('from_epoch', '?')}, host {a.get('host', '?')}"
                    + (f" (Ray node `{str(a['node'])[:12]}…`)" if a.get("node") else "")
                    + f", {a.get('started_at', '?')} to {a.get('ended_at', '?')}: {_escape(str(a.get('ended', '?')))}"
                    for n, a in enumerate(attempts, 1)), ""]
    if run.settings:
        lines += ["## Settings", "", " ".join(f"`{_escape(k)}={_escape(v)}`" for k, v in run.settings.items()), "",
                  *_pasteable(_typed(run.overrides), "To train it again:"), ""]
    lines += [f"## Scores (best epoch picked by `{run.monitor}`)", "", *_scores_table(run), ""]
    facts = []
    if run.parameters is not None:
        facts.append(f"{run.parameters:,} parameters")
    for key, text in (("seconds_per_epoch", "{:.1f} s per epoch"), ("total_seconds", "{:.0f} s in all"),
                      ("predict_val_seconds", "{:.2f} s to predict the val split")):
        if run.value(key) is not None:
            facts.append(text.format(run.value(key)))
    lines += ["; ".join(facts) + "." if facts else "", ""]
    ious = [(name, run.best_value(f"val/iou/{name}")) for name in run.class_names]
    if any(v is not None for _, v in ious):
        lines += ["## IoU per class at the best epoch", "", "| class | IoU % |", "|---|---:|"]
        lines += [f"| {_escape(name)} | {_pct(value)} |" for name, value in ious]
        lines += ["", "— : class absent from ground truth and prediction.", ""]
    lines += [*_label_census([run]), *study, *_figures(figures, out_dir)]
    return "\n".join(line for line in lines).rstrip() + "\n"
