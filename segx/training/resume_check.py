"""Before a resume writes anything: the checkpoint's run and the new config must train the same network on the
same classes at the same size; what else changed (more epochs, say) is allowed and listed."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from segx.core.errors import SegxError
from segx.inference.checkpoint import load_checkpoint, run_config
from segx.models import LEGACY_MODEL_KEYS

#: Settings a resumed run must share with its checkpoint: the weights (model), what the classes are (data's kind
#: and class list) and the input size the network learnt. Every other setting may change on resume.
FIXED = ("model.", "data._target_", "data.image_size", "data.num_classes", "data.class_names", "data.ignore_index")
#: Keys that say how this process was started, never a difference worth recording.
UNRECORDED = ("ckpt_path", "hydra.")


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _settings(cfg: DictConfig | dict) -> dict[str, Any]:
    """The flattened, resolved settings of a run config; keys that cannot be resolved yet are left out."""
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    container: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        try:
            container[str(key)] = OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(
                cfg[key]) else cfg[key]
        except Exception:  # e.g. ${hydra:...} before Hydra has set up the job
            continue
    flat = _flatten(container)
    for key in LEGACY_MODEL_KEYS:  # older checkpoints kept run options in the model node
        flat.pop(f"model.{key}", None)
    return flat


def _fixed(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in FIXED)


def _show(value: Any) -> str:
    return "(not set)" if value is _MISSING else repr(value) if isinstance(value, str) else str(value)


_MISSING = object()


def resume_changes(stored: DictConfig | dict, cfg: DictConfig) -> tuple[list[str], dict[str, list[Any]]]:
    """(the fixed settings that differ, as `key: old → new` lines; every other changed setting as key → [old,
    new]) between a checkpoint's run config and the config resuming it."""
    old, new = _settings(stored), _settings(cfg)
    refused, changed = [], {}
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if before == after or key.startswith(UNRECORDED):
            continue
        if _fixed(key):
            refused.append(f"{key}: {_show(before)} → {_show(after)}")
        else:
            changed[key] = [None if before is _MISSING else before, None if after is _MISSING else after]
    return refused, changed


@functools.lru_cache(maxsize=4)
def _stored_config(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """A checkpoint's run config, read once per file version: a single run checks it before Hydra writes anything
    (RunGuard) and again where training starts, and a checkpoint with optimizer state can be gigabytes."""
    return OmegaConf.to_container(run_config(load_checkpoint(path)), resolve=True)


def check_resume(checkpoint_path: str | Path, cfg: DictConfig) -> dict[str, list[Any]]:
    """SegxError naming what differs when the checkpoint's run trained another network, other classes or another
    image size than `cfg`; else the settings that changed (to record)."""
    stat = Path(checkpoint_path).stat()
    stored = _stored_config(str(Path(checkpoint_path).resolve()), stat.st_mtime_ns, stat.st_size)
    refused, changed = resume_changes(stored, cfg)
    if refused:
        raise SegxError(
            f"ckpt_path={checkpoint_path} was written by a run of another network, classes or image size than this "
            f"command's: {'; '.join(refused)}. Resuming it would fail or train something else; nothing in the run "
            "directory was changed. Resume with the checkpoint's settings (its run's .hydra/overrides.yaml), or "
            "start a new run in another hydra.run.dir (ckpt_path=null)."
        )
    return changed
