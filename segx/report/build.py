"""`write_report`: report.csv, plots/ and report.md for a set of runs (a sweep, several, or one run)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segx.core.files import write_text_atomic
from segx.report import study_points, what_if
from segx.report.figures import Figure, draw_figures
from segx.report.markdown import run_markdown, sweep_markdown
from segx.report.runs import Run, group_runs, rank, varying_keys
from segx.report.search import find_search
from segx.report.tables import configuration_row, to_csv


@dataclass
class Report:
    """What `write_report` wrote: the rows of report.csv (best first) and the figures."""

    out_dir: Path
    rows: list[dict[str, Any]]
    figures: list[Figure] = field(default_factory=list)


def write_report(runs: list[Run], out_dir: str | Path, roots: Sequence[str | Path] = (), over: str = "seed",
                 images: int = 4) -> Report:
    """Write report.csv, plots/*.png and report.md (last, so it never links a figure not yet written) into
    `out_dir`, each atomically; where some runs were trained as the study's chained trials, also study_points.csv
    and plots/study_points.png. One run gets a run report; several runs are grouped over `over`."""
    if not runs:
        raise ValueError("write_report needs at least one run")
    out_dir = Path(out_dir)
    configs = rank(group_runs(runs, over))
    report = Report(out_dir=out_dir, rows=[configuration_row(c) for c in configs])
    write_text_atomic(out_dir / "report.csv", to_csv(report.rows))
    single = len(runs) == 1
    root_dirs = [Path(r) for r in roots] or [out_dir]
    search = find_search(runs, root_dirs)
    figures = draw_figures(configs, out_dir, single=single, images=images, search=search,
                           keys=varying_keys(runs, over))
    study, study_figure = study_points.write(runs, out_dir, root_dirs, over)  # the figure goes in its section
    monitor = configs[0].monitor if configs else "val/miou"
    replayed, replay_figure = what_if.write(runs, out_dir, monitor) if not single else ([], None)
    report.figures = [*figures, *([study_figure] if study_figure else []), *([replay_figure] if replay_figure else [])]
    if single:
        text = run_markdown(runs[0], figures, out_dir, study)
    else:
        text = sweep_markdown(report.rows, configs, runs, figures, out_dir, root_dirs, over, search,
                              [*study, *replayed])
    write_text_atomic(out_dir / "report.md", text)
    return report
