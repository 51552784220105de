"""GPU paths: mixed-precision training (trainer=gpu, precision auto), evaluation on CUDA, sweeps over several
GPUs. Skipped without the GPUs they need."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_entry_point

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU (trainer=gpu trains in mixed precision on cuda)")


def test_bf16_training_on_gpu_and_cuda_evaluation(shapes_root: Path, tmp_path: Path) -> None:
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    run_entry_point("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "trainer=gpu",
                    "optimizer.lr=3e-3", "trainer.max_epochs=4", f"hydra.run.dir={run_dir}")
    metrics = read_json(run_dir / "metrics.json")
    # the same run on a CPU: 0.27 (fp32) and 0.24 (bf16) after 4 epochs, crossing 0.15 between epochs 2 and 4
    assert metrics["best"]["val/miou"] > 0.10
    expected = "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "16-mixed"
    assert metrics["precision"] == expected and metrics["accelerator"] == "cuda"
    run_entry_point("evaluate.py", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}", "device=cuda",
                    f"hydra.run.dir={eval_dir}")
    # evaluation runs through segx.inference.predictor in the run's precision, batched differently: close, not identical
    assert read_json(eval_dir / "metrics.json")["miou"] == pytest.approx(metrics["best"]["val/miou"], abs=0.05)


def test_device_resident_data_and_a_compiled_network_on_gpu(shapes_root: Path, tmp_path: Path) -> None:
    """data.on_device=auto moves the splits to the GPU; run.compile=true trains; both paths give the same run."""
    runs = {}
    for name, extra in (("resident", ["run.compile=true"]), ("loader", ["data.on_device=false"])):
        run_dir = tmp_path / name
        run_entry_point("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "trainer=gpu",
                        "trainer.max_epochs=2", *extra, f"hydra.run.dir={run_dir}")
        runs[name] = read_json(run_dir / "metrics.json")
        served = "data.on_device: the train split (96 images" in (run_dir / "train.log").read_text()
        assert served == (name == "resident")
    assert runs["resident"]["status"] == runs["loader"]["status"] == "completed"
    assert runs["resident"]["epochs"] == 2 and runs["resident"]["forward_gflops_per_image"] > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one sweep job per GPU)")
def test_sweep_jobs_get_a_gpu_each_and_the_basic_launcher_suggests_gpus(shapes_root: Path, tmp_path: Path) -> None:
    common = [*TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "trainer.max_epochs=1", "seed=1,2"]
    result = run_entry_point("train.py", "-m", *common, f"hydra.sweep.dir={tmp_path / 'basic'}")
    assert "hydra/launcher=gpus" in result.stdout + result.stderr
    run_entry_point("train.py", "-m", *common, "hydra/launcher=gpus", f"hydra.sweep.dir={tmp_path / 'gpus'}")
    devices = {read_json(tmp_path / "gpus" / str(n) / "metrics.json")["devices"] for n in range(2)}
    assert len(devices) == 2
