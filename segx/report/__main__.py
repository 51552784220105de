"""`python -m segx.report DIR [DIR ...] [--out DIR]`: report.md, report.csv and plots/ for sweeps or runs."""

from segx.report.cli import console

console()
