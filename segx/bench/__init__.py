"""Speed figures, measured side by side: `python -m segx.bench --json bench.json` (see `segx.bench.cli`).

Performance targets are checked against these figures, never in timed unit tests.
"""

from typing import Any

__all__ = ["main", "run"]


def __getattr__(name: str) -> Any:
    # Lazy: `python -m segx.bench.gpu_check` must import without torch, to say what is missing.
    if name in __all__:
        from segx.bench import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'segx.bench' has no attribute {name!r}")
