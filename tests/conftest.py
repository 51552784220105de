"""Shared fixtures: a small shapes dataset and helpers that run the real entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from tests.in_process import run_in_process

ROOT = Path(__file__).resolve().parents[1]

# Narrow network and small data: the whole suite must stay fast on 2 CPU cores.
TINY_MODEL = ["model=unet_small", "model.encoder_widths=[16,32]", "model.bottleneck_width=64"]
TINY_SHAPES = ["data=shapes", "data.num_train=96", "data.num_val=16", "data.min_size=48", "data.max_size=80",
               "data.image_size=32", "data.batch_size=8"]
# Only where a test's output is irrelevant and the progress bar is not what it covers: the end-to-end tests of the
# headline commands (a run, a sweep, trainer=ddp, evaluate, the study presets) run with the shipped bar.
QUIET = ["trainer.enable_progress_bar=false"]


def run_entry_point(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run train.py / evaluate.py exactly as a user would, in a subprocess (`run_in_process` where that is not the
    point)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run(
        [sys.executable, str(ROOT / script), *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        raise AssertionError(f"{script} failed ({result.returncode}):\n{output}")
    return result


@pytest.fixture(scope="session", autouse=True)
def own_compile_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """torch.compile's kernels in a folder of the session's (and its subprocesses'), not the machine's
    /tmp/torchinductor_<user>: a warm cache left by an earlier run would hide the cost of a compile."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path_factory.mktemp("torchinductor"))
    yield
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def keras() -> Any:
    """Keras 3 on the torch backend. Its import creates absl's log handler, which keeps the stderr of that moment
    and closes it when the handler is closed: imported under pytest's capture, a later in-process run that closes
    its handlers would close pytest's stream. So it is imported with the process' own streams in place."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    with redirect_stdout(sys.__stdout__), redirect_stderr(sys.__stderr__):
        return pytest.importorskip("keras", reason="Keras 3 is in the dev extra (pip install 'segx[dev]')")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shapes tree matching TINY_SHAPES, generated once per session."""
    from segx.data.shapes import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(root, num_train=96, num_val=16, seed=0, min_size=48, max_size=80)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, shapes_root: Path) -> Path:
    """One short real training run on shapes, shared by the tests that inspect its outputs."""
    run_dir = tmp_path_factory.mktemp("run")
    run_in_process(
        "train.py", *TINY_MODEL, *TINY_SHAPES, f"data.root={shapes_root}", "optimizer.lr=3e-3",
        "optimizer.decay=1e-3", "trainer.max_epochs=10", "trainer.accelerator=cpu", f"hydra.run.dir={run_dir}",
    )
    return run_dir


@contextmanager
def mounted_tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A filesystem of its own at `mount` (tmpfs with `options`, e.g. `size=3M` or `ro,size=1M`), unmounted
    afterwards; the test is skipped where it cannot be mounted (not root, no mount)."""
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"needs root to mount a tmpfs ({options})")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def shapes_split_files(shapes_root: Path, split: str, count: int | None = None):
    """The files of a split of the generated shapes tree, as a source lists them (the first `count` ids)."""
    from segx.data.source import SplitFiles

    voc = shapes_root / "VOCdevkit" / "VOC2012"
    ids = (voc / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[:count]
    return SplitFiles(ids, [voc / "JPEGImages" / f"{i}.jpg" for i in ids],
                      [voc / "SegmentationClass" / f"{i}.png" for i in ids])
