"""Speed figures, measured side by side: `python -m segx.bench --json bench.json` (see `segx.bench.cli`).

Performance targets are checked against these figures, never in timed unit tests.
"""

from segx.bench.cli import main, run

__all__ = ["main", "run"]
