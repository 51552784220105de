"""A built wheel works without the checkout: configs inside the package, every console command on data=shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES

pytestmark = pytest.mark.slow
COMMANDS = ("segx-train", "segx-evaluate", "segx-predict", "segx-export", "segx-report", "segx-bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (path,) = out.glob("segx-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A new venv outside the checkout with the wheel installed; the dependencies come from this test's environment
    (a path entry, so that environment's editable-install hook, which would find the checkout, is not run)."""
    env_dir = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return env_dir


def _start(env_dir: Path, cwd: Path, command: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", PYTHONUNBUFFERED="1", XDG_CACHE_HOME=str(cwd / "cache"))
    return subprocess.Popen([str(env_dir / "bin" / command), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _run(env_dir: Path, cwd: Path, *commands: tuple[str, ...]) -> None:
    """Each command with its arguments, side by side (each spends most of its time importing, on one core)."""
    started = [(command[0], _start(env_dir, cwd, *command)) for command in commands]
    for name, process in started:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name} failed ({process.returncode}):\n{output[-3000:]}"


def test_the_wheel_carries_the_configs_and_no_tests(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    conf = sorted(name.removeprefix("segx/conf/") for name in names if name.startswith("segx/conf/"))
    assert conf == sorted(p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*.yaml"))
    assert "hydra_plugins/segx_gpus_launcher/gpus_launcher.py" in names
    assert not [name for name in names if name.startswith(("tests/", "conf/"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert all(f"{command} =" in zipfile.ZipFile(wheel).read(entry_points).decode() for command in COMMANDS)


def test_every_console_command_runs_from_another_directory(installed: Path, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    python = installed / "bin" / "python"
    probe = "import segx, segx.core.config_dir as c; print(segx.__file__, c.CONF_DIR)"
    where = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True, check=True)
    where = where.stdout.split()
    assert not where[0].startswith(str(ROOT)) and where[1] == str(Path(where[0]).parent / "conf")

    shapes = [*TINY_MODEL, *TINY_SHAPES, *QUIET, "data.root=shapes", "trainer.max_epochs=1", "logger=csv"]
    _run(installed, work, ("segx-train", *shapes, "hydra.run.dir=run"))
    assert json.loads((work / "run" / "metrics.json").read_text())["status"] == "completed"
    ckpt = "run/checkpoints/last.ckpt"
    image = next((work / "shapes").rglob("*.jpg"))
    _run(installed, work, ("segx-evaluate", f"ckpt={ckpt}", "hydra.run.dir=evaluated"),
         ("segx-predict", f"ckpt={ckpt}", f"input={image}", "output=predicted", "progress=false"),
         ("segx-export", f"ckpt={ckpt}", "output=model.onnx"),
         ("segx-report", "run"),
         ("segx-bench", "--device", "cpu", "--sections", "memory_format", "--models", "unet_small", "--size", "32",
          "--batch", "2", "--repeats", "1", "--workdir", "bench", "--json", "bench.json"))
    assert "miou" in json.loads((work / "evaluated" / "metrics.json").read_text())
    assert (work / "predicted" / f"{image.stem}.png").is_file()
    assert (work / "model.onnx").stat().st_size > 0
    assert (work / "run" / "report.md").is_file()
    assert (work / "bench.json").is_file()
