"""`python -m segx.report DIR [DIR ...]`: the only place the report reads the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from segx.core.files import write_text_atomic
from segx.report.build import write_report
from segx.report.runs import collect_runs, common_overrides
from segx.report.tables import print_summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segx.report",
        description="Summarise training runs: report.md, report.csv and plots/ from their metrics.json and .hydra/ "
                    "files (no re-training, no TensorBoard). Jobs that differ only by the seed form one configuration.")
    parser.add_argument("dirs", type=Path, nargs="+", metavar="DIR",
                        help="a multirun/<date>/<time> sweep folder, any folder of runs, or one run directory")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: the first DIR)")
    parser.add_argument("--over", default="seed", help="the override to aggregate over (default: seed)")
    parser.add_argument("--images", type=int, default=4, help="val images in the predictions figure (default: 4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the ranked rows as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Write the report and print the ranked table; returns the rows of report.csv (best first).
    Exits with code 2 when a folder is missing or holds no segx training run."""
    args = parse_args(argv)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"segx.report: not a folder: {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    runs = collect_runs(*args.dirs)
    if not runs:
        print(f"No segx training runs (metrics.json or .hydra/overrides.yaml) under {', '.join(map(str, args.dirs))}.",
              file=sys.stderr)
        sys.exit(2)
    out_dir = args.out or args.dirs[0]
    report = write_report(runs, out_dir, roots=args.dirs, over=args.over, images=args.images)
    print_summary(report.rows, common_overrides(runs) if len(runs) > 1 else None)
    if args.json:
        write_text_atomic(args.json, json.dumps(report.rows, indent=2) + "\n")
    print(f"Report: {out_dir / 'report.md'} (table: report.csv, figures: {len([f for f in report.figures if f.path])} "
          f"in {out_dir / 'plots'})")
    for figure in report.figures:
        if figure.skipped:
            print(f"  {figure.name} not drawn: {figure.skipped}")
    return report.rows


def console() -> None:
    """`segx-report` and `python -m segx.report`: `main` with Ctrl-C as exit code 130 (every file is written
    atomically, so nothing half-written is left behind)."""
    try:
        main()
    except KeyboardInterrupt:
        print("segx.report: interrupted", file=sys.stderr)
        sys.exit(130)
