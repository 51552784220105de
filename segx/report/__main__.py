"""`python -m segx.report DIR [DIR ...] [--out DIR]`: report.md, report.csv and plots/ for sweeps or runs."""

import sys

from segx.report.cli import main

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every file is written atomically: nothing half-written is left behind
        print("segx.report: interrupted", file=sys.stderr)
        sys.exit(130)
