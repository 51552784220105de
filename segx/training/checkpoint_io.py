"""Checkpoints written beside their destination and renamed into place: a full disk keeps the last good one."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from segx.core.files import atomic_path


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's TorchCheckpointIO, except that a local checkpoint goes to a temp file in its own folder, renamed
    onto the target when complete (Lightning's writes it in the system's temp folder and copies it across
    filesystems, so a full disk leaves a truncated best.ckpt). A failed write leaves no temp file behind and names
    the file, its filesystem and the free space (segx.core.files.DiskFullError)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote storage: Lightning's own way
            return
        with atomic_path(path.removeprefix("file://")) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)  # through a Python file: a full disk surfaces as OSError ENOSPC
