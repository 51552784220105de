"""Where segx's Hydra configs are: `segx/conf/` in an installed wheel, the checkout's top-level `conf/` otherwise."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parents[1]


def config_dir() -> Path:
    """The folder holding train.yaml and the config groups (shipped inside the wheel as `segx/conf`)."""
    for candidate in (_PACKAGE / "conf", _PACKAGE.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"segx's configs were not found: neither {_PACKAGE / 'conf'} (an installed wheel) nor "
        f"{_PACKAGE.parent / 'conf'} (a checkout) holds train.yaml. "
        "Reinstall segx (pip install segx, or pip install -e . in the checkout)."
    )


CONF_DIR = str(config_dir())  # Hydra takes an absolute config_path as it is
