"""GPU paths: bf16 mixed-precision training (trainer=gpu) and evaluation on CUDA. Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_entry_point

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (trainer=gpu uses bf16 mixed precision on cuda)")


def test_bf16_training_on_gpu_and_cuda_evaluation(shapes_root: Path, tmp_path: Path) -> None:
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    run_entry_point("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "trainer=gpu",
                    "optimizer.lr=3e-3", "trainer.max_epochs=4", f"hydra.run.dir={run_dir}")
    metrics = read_json(run_dir / "metrics.json")
    assert metrics["best"]["val/miou"] > 0.15
    run_entry_point("evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", "device=cuda",
                    f"hydra.run.dir={eval_dir}")
    # evaluation runs in float32, training validated under bf16 autocast: close, not identical
    assert read_json(eval_dir / "metrics.json")["miou"] == pytest.approx(metrics["best"]["val/miou"], abs=0.05)
