"""`python -m segx.bench.gpu_check [--json PATH]` (`make gpu-check`): one command that checks a CUDA machine.

Runs bf16 training and evaluation first, then 16-mixed training, the DataLoader path, a `hydra/launcher=gpus`
sweep, a compiled network, the CUDA tests and `segx.bench --device cuda`, each in its own subprocess, within a time
budget (`--budget`, `--quick`). The JSON report is rewritten after every part, and SIGTERM or Ctrl-C stops the
running part's processes and leaves a partial report. Only the standard library is imported at the top, so that
an interpreter that lacks torch or Hydra still gets told what is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.machinery import PathFinder
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # the checkout (or site-packages when segx is installed from a wheel)
CHECKOUT = (REPO / "conf" / "train.yaml").is_file() and (REPO / "segx").is_dir()
# Cheap, high-value parts first, so that a run cut short has checked the most it could.
PART_NAMES = ("train-bf16", "evaluate", "train-16", "loader", "sweep", "compile", "cuda-tests", "bench")
QUICK_PARTS = ("train-bf16", "evaluate", "train-16", "loader", "sweep", "compile")  # the CUDA tests repeat these
NO_CUDA_EXIT = 2  # nothing could run here; 1 means a part failed
INCOMPLETE_EXIT = 3  # no part failed, but some were skipped or cut short (or none passed)
DEFAULT_BUDGET_S = 480.0  # the whole run, well inside a 10-minute command on a lent machine
QUICK_BUDGET_S = 300.0
MIN_PART_S = 45.0  # a part that would get less of the budget than this is skipped rather than cut

# Distribution name -> the module that proves it is importable (where the two differ).
IMPORT_NAMES = {
    "pytorch-lightning": "pytorch_lightning",
    "hydra-core": "hydra",
    "hydra-ray-launcher": "hydra_plugins.hydra_ray_launcher",
    "hydra-submitit-launcher": "hydra_plugins.hydra_submitit_launcher",
    "segmentation-models-pytorch": "segmentation_models_pytorch",
    "pillow": "PIL",
}
# Wheels for these install on any platform (`pip download` on another machine, then `pip install --no-index`).
PURE_PYTHON = {"pytorch-lightning", "hydra-core", "omegaconf", "hydra-ray-launcher", "hydra-submitit-launcher",
               "segmentation-models-pytorch", "torchmetrics", "rich", "filelock", "tensorboard", "pytest"}
# Dependencies that training does not need: everything else of [project] dependencies is needed by every part.
NOT_FOR_TRAINING = {"ray", "hydra-ray-launcher", "hydra-submitit-launcher", "onnx", "onnxruntime", "tensorboard"}
EXTRA_REQUIREMENTS = ["pytest>=8"]  # the CUDA tests' runner (segx's dev extra)

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*([^;]*)")
_VERSION = re.compile(r"\d+(?:\.\d+)*")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------- dependencies


def project_requirements(pyproject: Path | None = None) -> list[str]:
    """segx's [project] dependencies: pyproject.toml's in a checkout, else the installed segx's metadata."""
    pyproject = pyproject or REPO / "pyproject.toml"
    if pyproject.is_file():
        text = pyproject.read_text(encoding="utf-8")
        try:
            import tomllib  # Python >= 3.11

            return list(tomllib.loads(text)["project"]["dependencies"])
        except ImportError:
            project = text.split("[project]", 1)[-1]
            block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", project, re.S | re.M)
            return re.findall(r"\"([^\"]+)\"", block.group(1)) if block else []
    try:
        requires = importlib.metadata.requires("segx") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [r for r in requires if "extra ==" not in r]


def _release(version: str) -> tuple[int, ...] | None:
    match = _VERSION.match(version.strip())
    return tuple(int(p) for p in match.group(0).split(".")) if match else None


def _satisfies(installed: str, spec: str) -> bool:
    """Whether `installed` meets a specifier such as `>=2.10,<3` (release numbers only; unknown forms pass)."""
    have = _release(installed)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        op, wanted = re.match(r"(~=|===|==|!=|<=|>=|<|>)?\s*(.*)", clause).groups()
        want = _release(wanted)
        if have is None or want is None or op in (None, "==="):
            continue
        width = max(len(have), len(want))
        a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if wanted.endswith(".*"):
            a = a[: len(want)]
            b = b[: len(want)]
        ok = {"~=": a >= b, ">=": a >= b, "==": a == b, "!=": a != b, "<=": a <= b, "<": a < b, ">": a > b}[op]
        if not ok:
            return False
    return True


def _importable(module: str, path: list[str] | None) -> bool:
    if path is None:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    search: list[str] | None = path
    for part in module.split("."):
        spec = PathFinder.find_spec(part, search) if search is not None else None
        if spec is None:
            return False
        search = list(spec.submodule_search_locations or []) or None
    return True


def missing_requirements(requirements: Iterable[str], path: list[str] | None = None) -> dict[str, str]:
    """Canonical name -> why it is unusable ("not installed", "2.3 installed, needs >=2.5") for each requirement
    this interpreter (or the folders in `path`) cannot satisfy. A module importable without package metadata
    (e.g. a torch on PYTHONPATH) counts as present."""
    missing = {}
    for requirement in requirements:
        match = _REQUIREMENT.match(requirement)
        if not match:
            continue
        name, spec = canonical(match.group(1)), match.group(2).strip()
        dist = next(iter(importlib.metadata.distributions(name=name, **({"path": path} if path else {}))), None)
        if dist is not None:
            if spec and not _satisfies(dist.version, spec):
                missing[name] = f"{dist.version} installed, needs {spec}"
        elif not _importable(IMPORT_NAMES.get(name, name.replace("-", "_")), path):
            missing[name] = "not installed"
    return missing


def install_hint(missing: dict[str, str], python: str = sys.executable) -> str:
    """How to install what is missing on a node without internet."""
    names = sorted(missing)
    pure = [n for n in names if n in PURE_PYTHON]
    lines = [f"segx dependencies missing for {python}: " + ", ".join(f"{n} ({missing[n]})" for n in names)]
    if pure:
        lines.append(f"  {', '.join(pure)} are pure Python: on a machine with internet `pip download -d wheels "
                     f"{' '.join(pure)}`, bring the folder along, then here `{python} -m pip install --no-index "
                     f"--find-links wheels {' '.join(pure)}`.")
    compiled = [n for n in names if n not in PURE_PYTHON]
    if compiled:
        lines.append(f"  {', '.join(compiled)} have compiled wheels: download them for this node's Python version "
                     "and platform (pip download --python-version X.Y --platform manylinux2014_x86_64 "
                     "--only-binary=:all:), or use a Python that already holds them.")
    lines.append("  Parts that need them are reported as skipped.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CUDA probe

_PROBE = r"""
import json
try:
    import torch
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
    raise SystemExit(0)
import warnings
with warnings.catch_warnings(record=True) as caught:  # torch says here why CUDA cannot be used (an old driver, ...)
    warnings.simplefilter("always")
    available = torch.cuda.is_available()
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": available,
        "warning": " ".join(" ".join(str(w.message).split()) for w in caught)[:400]}
if info["available"]:
    info["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    info["gpus"] = [{"index": i, "name": torch.cuda.get_device_name(i),
                     "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                     "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                    for i in range(torch.cuda.device_count())]
print(json.dumps(info))
"""


def probe_cuda(python: str = sys.executable, timeout: float = 120) -> dict[str, Any]:
    """torch's view of the GPUs, asked in a subprocess (a broken driver can hang; this process stays torch-free)."""
    if python == sys.executable and not _importable("torch", None):
        return {"error": "No module named 'torch'"}
    try:
        done = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": f"asking torch for the GPUs did not finish in {timeout:.0f}s (a hung driver?)"}
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": _last_line(done.stderr) or f"the probe exited {done.returncode}"}


def no_cuda_line(info: dict[str, Any], python: str = sys.executable) -> str | None:
    """The one line said where no CUDA GPU can be used; None where one can."""
    if "error" in info:
        return (f"gpu-check: {python} cannot use torch ({info['error']}), so no CUDA GPU can be checked; install a "
                "CUDA build of torch for it or pass another interpreter (make gpu-check PY=...); "
                f"`{python} -m segx.bench.gpu_check --deps` lists what else is missing.")
    if not info.get("available") or not info.get("gpus"):
        build = f"CUDA {info['cuda_build']} build" if info.get("cuda_build") else "CPU-only build"
        said = f"; torch says: {info['warning']}" if info.get("warning") else ""
        return (f"gpu-check: no CUDA GPU is visible here (torch {info.get('torch')}, {build}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}, NVIDIA driver "
                f"{driver_version()}{said}); run it on a machine with an NVIDIA GPU and a driver new enough for "
                "the build.")
    return None


def driver_version() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown (nvidia-smi: {error})"
    lines = done.stdout.strip().splitlines()
    return lines[0].strip() if done.returncode == 0 and lines else f"unknown (nvidia-smi: {_last_line(done.stderr)})"


def _find_libcuda() -> bool:
    try:
        listed = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        listed = ""
    return "libcuda.so.1" in listed


def compile_toolchain() -> dict[str, Any]:
    """What Inductor needs on CUDA besides torch: a C compiler, the interpreter's Python.h, and libcuda.so.1
    where ldconfig finds it."""
    import sysconfig

    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"c_compiler": shutil.which(compiler) if compiler else None, "python_h": header.is_file(),
            "python_h_path": str(header), "libcuda": _find_libcuda()}


def toolchain_gap(toolchain: dict[str, Any]) -> str | None:
    """Why Inductor could not build kernels here, or None."""
    gaps = [text for ok, text in ((toolchain["c_compiler"], "a C compiler (cc, gcc or clang; or $CC)"),
                                  (toolchain["python_h"], f"Python.h ({toolchain['python_h_path']}: install the "
                                                          "interpreter's development headers)"),
                                  (toolchain["libcuda"], "libcuda.so.1 where ldconfig finds it")) if not ok]
    return "torch.compile on CUDA needs " + ", ".join(gaps) if gaps else None


def shm_megabytes() -> float | None:
    """The size of /dev/shm, where DataLoader workers and spawned DDP ranks pass tensors."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_blocks * stats.f_frsize / 2**20


def preflight(missing: dict[str, str]) -> dict[str, Any]:
    """The machine as the parts will find it: driver, compile toolchain, /dev/shm, dependencies."""
    return {"driver": driver_version(), **compile_toolchain(), "dev_shm_mb": shm_megabytes(),
            "missing": dict(missing)}


def preflight_line(facts: dict[str, Any]) -> str:
    shm = facts["dev_shm_mb"]
    return ("gpu-check preflight: NVIDIA driver " + str(facts["driver"])
            + f"; C compiler {facts['c_compiler'] or 'none'}; Python.h {'found' if facts['python_h'] else 'missing'}"
            + f"; libcuda.so.1 {'found' if facts['libcuda'] else 'not found by ldconfig'}"
            + f"; /dev/shm {'absent' if shm is None else f'{shm:,.0f} MB'}"
            + ("; dependencies: all present" if not facts["missing"] else
               f"; missing: {', '.join(facts['missing'])}"))


# ---------------------------------------------------------------------------------------------- the parts


@dataclass
class Part:
    """One check: a command, what it needs, and how its outputs are judged."""

    name: str
    argv: list[str]
    needs: tuple[str, ...]
    timeout: float
    judge: Callable[[Part, str], tuple[bool, str, dict[str, Any]]]  # (part, its log) -> passed, figure, figures
    output: Path | None = None         # the run / sweep directory or JSON file it writes
    config: str | None = None          # the Hydra config its overrides compose with (train, evaluate)
    overrides: list[str] = field(default_factory=list)
    after: str | None = None           # a part whose checkpoint this one reads (skipped unless that passed)
    skip: str | None = None            # a reason known before anything runs


@dataclass
class Result:
    part: str
    status: str                        # pass, fail or skipped
    seconds: float
    figure: str
    figures: dict[str, Any] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    log: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def judge_tests(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    """pytest's exit code decides; the figure is its summary line (how many passed and were skipped)."""
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped)", line)]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary[-1])} \
        if summary else {}
    figure = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no tests ran"
    if not counts.get("passed"):  # every test skipped (no GPU they need) checks nothing
        return False, f"no test passed ({figure})", counts
    return True, figure, counts


def judge_train(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    """A training run passed when it completed on CUDA in the precision asked for (when one was)."""
    metrics = _read_json(part.output / "metrics.json")
    wanted = next((o.split("=", 1)[1] for o in part.overrides if o.startswith("trainer.precision=")), None)
    epochs = metrics.get("epoch_seconds") or []
    figures = {"status": metrics.get("status"), "accelerator": metrics.get("accelerator"),
               "precision": metrics.get("precision"), "devices": metrics.get("devices"),
               "val_miou": (metrics.get("best") or {}).get("val/miou"), "epoch_seconds": epochs,
               "forward_gflops_per_image": metrics.get("forward_gflops_per_image")}
    problems = []
    if metrics.get("status") != "completed":
        problems.append(f"status {metrics.get('status')}")
    if metrics.get("accelerator") != "cuda":
        problems.append(f"trained on {metrics.get('accelerator')}, not cuda")
    if wanted and metrics.get("precision") != wanted:
        problems.append(f"precision {metrics.get('precision')}, not {wanted}")
    miou = figures["val_miou"]
    steps = ", ".join(f"{s:.2f}" for s in epochs)
    figure = f"{metrics.get('precision')}, mIoU {miou:.3f}, epochs {steps} s" if miou is not None else "no score"
    return not problems, "; ".join(problems) or figure, figures


def judge_compile(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    passed, figure, figures = judge_train(part, log)
    epochs = figures["epoch_seconds"]
    if passed and len(epochs) >= 2:
        figure = f"compiled, {figures['precision']}, epochs {epochs[0]:.2f}, {epochs[-1]:.2f} s"
    return passed, figure, figures


def _served_from(part: Part) -> str | None:
    train_log = (part.output / "train.log").read_text(encoding="utf-8", errors="replace")
    served = re.search(r"data\.on_device: the train split \((\d+) images, (\d+) MB\) is served from (\S+)",
                       train_log)
    return served.group(3) if served else None


def judge_on_device(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    """A training run whose train split was served from the GPU (data.on_device)."""
    passed, figure, figures = judge_train(part, log)
    served = figures["train_split_served_from"] = _served_from(part)
    if passed and not (served and served.startswith("cuda")):
        return False, "train.log does not say the train split is served from cuda", figures
    return passed, f"train split on {served}; {figure}" if passed else figure, figures


def judge_loader(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    """A training run through the DataLoader path (data.on_device=false): nothing served from the GPU."""
    passed, figure, figures = judge_train(part, log)
    served = figures["train_split_served_from"] = _served_from(part)
    if passed and served is not None:
        return False, f"the train split was served from {served}, not through a DataLoader", figures
    return passed, f"DataLoader; {figure}" if passed else figure, figures


def judge_evaluate(part: Part, log: str, trained: Path) -> tuple[bool, str, dict[str, Any]]:
    """Evaluation on CUDA scores close to the training run's best validation (batching and precision differ)."""
    miou = _read_json(part.output / "metrics.json")["miou"]
    best = (_read_json(trained / "metrics.json").get("best") or {}).get("val/miou")
    figures = {"miou": miou, "train_best_val_miou": best}
    if best is not None and abs(miou - best) > 0.05:
        return False, f"mIoU {miou:.3f} differs from training's {best:.3f} by more than 0.05", figures
    return True, f"mIoU {miou:.3f} (training's best {best:.3f})", figures


def judge_sweep(part: Part, log: str, jobs: int, gpus: int) -> tuple[bool, str, dict[str, Any]]:
    """Every job completed, and with several GPUs the jobs were spread over all of them."""
    runs = []
    for n in range(jobs):
        path = part.output / str(n) / "metrics.json"
        runs.append(_read_json(path) if path.is_file() else {"status": "no metrics.json"})
    on_cuda = [r for r in runs if r.get("status") == "completed" and r.get("accelerator") == "cuda"]
    devices = sorted({str(r.get("devices")) for r in on_cuda})
    done = sum(r.get("status") == "completed" for r in runs)
    spans = sorted((r["started_at"], r["ended_at"]) for r in runs if r.get("started_at") and r.get("ended_at"))
    overlapped = any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:], strict=False))
    figures = {"jobs": jobs, "completed": done, "on_cuda": len(on_cuda), "devices": devices,
               "jobs_overlapped": overlapped}
    figure = f"{done}/{jobs} jobs completed, {len(on_cuda)} on CUDA (GPU {' '.join(devices) or '-'}), " + \
             ("run side by side" if overlapped else "one after another")
    return len(on_cuda) == jobs and len(devices) >= min(gpus, jobs), figure, figures


def judge_bench(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    results = _read_json(part.output)
    unet = next((r for r in results.get("models", []) if r.get("model") == "unet"), {})
    targets = results.get("targets", {})
    figures = {"data_speedup": results.get("data_speedup"), "lightning_overhead": results.get("lightning_overhead"),
               "unet_train_images_per_second": unet.get("train_images_per_second"),
               "unet_predict_images_per_second": unet.get("predict_images_per_second"),
               "predict_val_seconds_unet": (results.get("predict_val_seconds") or {}).get("unet"),
               "targets_met": sum(t.get("met") is True for t in targets.values()), "targets": len(targets)}
    shown = [f"{label} {figures[key]:{fmt}}{unit}" for label, key, fmt, unit in (
        ("data", "data_speedup", ".1f", "x"), ("Lightning overhead", "lightning_overhead", ".3f", "x"),
        ("unet train", "unet_train_images_per_second", ",.0f", " img/s"),
        ("predict", "unet_predict_images_per_second", ",.0f", " img/s")) if figures[key] is not None]
    return True, ", ".join(shown) + f"; targets met {figures['targets_met']}/{figures['targets']}", figures


def training_needs() -> tuple[str, ...]:
    """The distributions a training run imports: segx's dependencies but the launchers, ONNX and TensorBoard
    (the parts log to CSV)."""
    names = [canonical(m.group(1)) for m in map(_REQUIREMENT.match, project_requirements()) if m]
    return tuple(n for n in names if n not in NOT_FOR_TRAINING) or ("torch", "hydra-core", "pytorch-lightning")


def shapes_overrides(workdir: Path) -> list[str]:
    """Small shapes data at 64 px, generated once under the work folder and shared by every part."""
    return ["data=shapes", f"data.root={workdir / 'shapes'}", "data.num_train=128", "data.num_val=32",
            "data.min_size=64", "data.max_size=96", "data.image_size=64", "data.batch_size=16"]


def build_parts(workdir: Path, gpus: int, bf16: bool = True, python: str = sys.executable,
                tests: Path | None = REPO / "tests" / "test_cuda.py", compile_gap: str | None = None) -> list[Part]:
    """The parts in the order they run, with their command lines (absolute paths under `workdir`);
    `compile_gap` (see `toolchain_gap`) skips the compile part with its reason."""
    workdir = workdir.resolve()
    train = [python, "-m", "segx.cli.train"]
    common = ["model=unet_small", *shapes_overrides(workdir), "trainer=gpu", "trainer.enable_progress_bar=false",
              "logger=csv"]
    trains = training_needs()

    def training(name: str, extra: list[str], judge: Callable, timeout: float, skip: str | None = None) -> Part:
        overrides = [*common, "trainer.max_epochs=2", *extra, f"hydra.run.dir={workdir / name}"]
        return Part(name, [*train, *overrides], trains, timeout, judge, workdir / name, "train", overrides, skip=skip)

    no_bf16 = None if bf16 else "this GPU has no native bf16 (compute capability < 8.0)"
    # data.on_device=auto (the default) serves the splits from the GPU: this part checks that path too.
    parts = [training("train-bf16", ["trainer.precision=bf16-mixed"], judge_on_device, 240, skip=no_bf16)]
    trained = "train-bf16" if bf16 else "train-16"
    evaluate = [f"ckpt={workdir / trained / 'checkpoints' / 'best.ckpt'}", "device=cuda",
                f"hydra.run.dir={workdir / 'evaluate'}"]
    parts.append(Part("evaluate", [python, "-m", "segx.cli.evaluate", *evaluate], trains, 180,
                      lambda p, log: judge_evaluate(p, log, workdir / trained), workdir / "evaluate", "evaluate",
                      evaluate, after=trained))
    parts.append(training("train-16", ["trainer.precision=16-mixed"], judge_train, 240))
    parts.append(training("loader", ["data.on_device=false"], judge_loader, 240))

    jobs = 2 * max(gpus, 1)  # two jobs per GPU: with one GPU they share it through fractions
    # A Ray of the sweep's own: never a cluster that $RAY_ADDRESS or an earlier `ray start` left on the machine.
    sweep = [*common, "trainer.max_epochs=1", "hydra/launcher=gpus", "hydra.launcher.ray.init.address=local",
             f"seed={','.join(map(str, range(1, jobs + 1)))}", f"hydra.sweep.dir={workdir / 'sweep'}"]
    if gpus == 1:
        sweep.append("hydra.launcher.ray.remote.num_gpus=0.5")
    parts.append(Part("sweep", [*train, "-m", *sweep], ("ray", "hydra-ray-launcher", *trains), 300,
                      lambda p, log: judge_sweep(p, log, jobs, gpus), workdir / "sweep", "train", sweep))
    # run.compile: the run option's name since the model group holds constructor arguments only (was model.compile)
    parts.append(training("compile", ["run.compile=true"], judge_compile, 420, skip=compile_gap))
    parts.append(Part("cuda-tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                      ("pytest", "tensorboard", *trains), 600, judge_tests,
                      skip=None if tests and tests.is_file() else f"{tests} is not here (no tests folder)"))
    bench_json = workdir / "bench.json"
    parts.append(Part("bench", [python, "-m", "segx.bench", *bench_arguments(workdir)], trains, 480, judge_bench,
                      bench_json))
    return parts


def bench_arguments(workdir: Path) -> list[str]:
    """`segx.bench` flags small enough for a minute or two on one GPU (its own defaults time the study's sizes)."""
    return ["--device", "cuda", "--json", str(workdir / "bench.json"), "--workdir", str(workdir / "bench-data"),
            "--images", "256", "--predict-images", "128", "--steps", "10", "--warmup", "3", "--models", "unet",
            "unet_small", "--model-batch", "32", "--repeats", "1",
            # the sections a GPU changes: data_memory and precision measure the CPU
            "--sections", "data", "loop", "predict", "models", "memory_format"]


def plan(parts: Sequence[Part], missing: dict[str, str], only: Iterable[str] | None = None) -> dict[str, str]:
    """Part name -> why it is skipped, for the parts that cannot run: not chosen, a known reason, or a
    missing dependency (a part that needs a skipped one is decided when it comes up)."""
    chosen = set(only) if only else None
    skipped = {}
    for part in parts:
        absent = [n for n in part.needs if canonical(n) in missing]
        if chosen is not None and part.name not in chosen:
            skipped[part.name] = "not in --parts"
        elif part.skip:
            skipped[part.name] = part.skip
        elif absent:
            skipped[part.name] = "needs " + ", ".join(f"{n} ({missing[canonical(n)]})" for n in absent)
    return skipped


# ---------------------------------------------------------------------------------------------- running


def _last_line(text: str) -> str:
    """The last line worth showing of a log: an exception's message rather than a blank or a progress bar."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b|^error\b|^FAILED|failed", line):
            return line
    return lines[-1] if lines else ""


class Interrupted(BaseException):
    """SIGTERM (a `timeout`, the end of a lease) or SIGINT (Ctrl-C) arrived while the parts ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def _stop(process: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop the part's whole process group (Ray workers, compile workers), politely first."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def subprocess_env() -> dict[str, str]:
    """The environment of each part: unbuffered output, full Hydra tracebacks in the logs, and the checkout on
    PYTHONPATH so that the parts (and Ray's workers) import this segx even when it is not installed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "1"}
    if CHECKOUT:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def run_part(part: Part, log_dir: Path, cwd: Path | None = None, timeout: float | None = None,
             budget_cut: bool = False) -> Result:
    """Run one part in its own process group with a timeout; its output goes to `log_dir/<name>.log`.
    `budget_cut`: the timeout is what the run's budget had left, so running past it is a cut, not a failure."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{part.name}.log"
    limit = timeout or part.timeout
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        log.write("$ " + " ".join(part.argv) + "\n")
        log.flush()
        process = subprocess.Popen(part.argv, cwd=cwd or (REPO if CHECKOUT else None), env=subprocess_env(),
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            code: int | None = process.wait(limit)
        except subprocess.TimeoutExpired:
            code = None
            _stop(process)
        except BaseException:
            _stop(process, grace=3)  # SIGTERM or Ctrl-C: take the part's processes down with this one, quickly
            raise
    seconds = time.perf_counter() - start
    result = Result(part.name, "fail", seconds, "", command=part.argv, log=str(log_path))
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code is None:
        if budget_cut:
            result.status = "cut"
            result.figure = f"cut by the time budget after {limit:.0f} s ({_last_line(text)[:80]})"
        else:
            result.figure = f"timed out after {limit:.0f} s ({_last_line(text)[:80]})"
        return result
    if code != 0:
        result.figure = f"exit {code}: {_last_line(text)}"
        return result
    try:
        passed, figure, figures = part.judge(part, text)
    except (OSError, ValueError, KeyError, TypeError) as error:  # an output missing or not as expected
        passed, figure, figures = False, f"outputs not as expected: {type(error).__name__}: {error}", {}
    result.status, result.figure, result.figures = ("pass" if passed else "fail"), figure, figures
    return result


def run_parts(parts: Sequence[Part], skipped: dict[str, str], log_dir: Path,
              say: Callable[[str], None] = print, timeout: float | None = None, budget: float | None = None,
              done: Callable[[list[Result], str | None], None] | None = None) -> list[Result]:
    """Each part in turn, within `budget` seconds in all (a part is given what is left, and skipped when less than
    MIN_PART_S is); `done(results, next part)` after every part. An `Interrupted` is re-raised once the running
    part's processes are stopped and it is recorded as cut."""
    results: dict[str, Result] = {}
    start = time.perf_counter()

    def finish(current: Result, number: int) -> None:
        results[current.part] = current
        if done is not None:
            done(list(results.values()), parts[number].name if number < len(parts) else None)

    for number, part in enumerate(parts, 1):
        reason = skipped.get(part.name)
        before = results.get(part.after) if part.after else None
        if reason is None and part.after and (before is None or before.status != "pass"):
            reason = f"needs {part.after}'s checkpoint ({before.status if before else 'not run'})"
        left = None if budget is None else budget - (time.perf_counter() - start)
        if reason is None and left is not None and left < MIN_PART_S:
            reason = f"the time budget ({budget:.0f} s) is spent"
        if reason is not None:
            say(f"[{number}/{len(parts)}] {part.name}: skipped, {reason}")
            finish(Result(part.name, "skipped", 0.0, reason, command=part.argv), number)
            continue
        limit = timeout or part.timeout
        say(f"[{number}/{len(parts)}] {part.name}: {' '.join(part.argv[1:4])} ... (log {log_dir / part.name}.log)")
        began = time.perf_counter()
        try:
            result = run_part(part, log_dir, timeout=min(limit, left) if left is not None else limit,
                              budget_cut=left is not None and left < limit)
        except Interrupted as signal_:
            cut = Result(part.name, "cut", time.perf_counter() - began, f"cut by {signal_} (its processes stopped)",
                         command=part.argv, log=str(log_dir / f"{part.name}.log"))
            finish(cut, len(parts))
            raise
        say(f"    {result.status} in {result.seconds:.1f} s: {result.figure}")
        finish(result, number)
    return list(results.values())


def format_table(results: Sequence[Result]) -> str:
    """One row per part: part, status, seconds, figure."""
    rows = [("part", "status", "seconds", "figure")]
    rows += [(r.part, r.status, "-" if r.status == "skipped" else f"{r.seconds:.1f}", r.figure) for r in results]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}  {d}".rstrip() for a, b, c, d in rows)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The JSON report, written atomically (segx's writer where segx imports, else the same by hand)."""
    try:
        from segx.core.files import write_json_atomic
    except ImportError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
        os.replace(tmp, path)
        return
    write_json_atomic(path, report)


def build_report(results: Sequence[Result], info: dict[str, Any], missing: dict[str, str], workdir: Path,
                 seconds: float, planned: Sequence[str] = (), running: str | None = None,
                 preflight_facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """`passed`: some part passed and none failed; `complete`: every planned part ran to its end (none skipped,
    cut or still to come). A report written mid-run names the part that runs next (`running`)."""
    ran = {r.part for r in results}
    complete = all(r.status in ("pass", "fail") for r in results) and all(name in ran for name in planned)
    return {"python": sys.executable, "torch": info.get("torch"), "cuda": info.get("cuda_build"),
            "gpus": info.get("gpus", []), "bf16": info.get("bf16"), "missing": missing, "workdir": str(workdir),
            "preflight": preflight_facts or {}, "seconds": round(seconds, 1),
            "passed": any(r.status == "pass" for r in results) and not any(r.status == "fail" for r in results),
            "complete": complete and running is None, "running": running,
            "parts": [asdict(r) for r in results]}


def exit_code(report: dict[str, Any]) -> int:
    """0: every part ran and passed; 1: a part failed; INCOMPLETE_EXIT: none failed, but some were skipped or
    cut, or none passed."""
    if any(part["status"] == "fail" for part in report["parts"]):
        return 1
    return 0 if report["passed"] and report["complete"] else INCOMPLETE_EXIT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segx.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"),
                        help="where the table goes as JSON (rewritten after every part)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/gpu-check"),
                        help="run directories, data and logs of the parts (emptied of old runs first)")
    parser.add_argument("--parts", nargs="*", choices=PART_NAMES, default=None, help="run only these parts")
    parser.add_argument("--quick", action="store_true",
                        help=f"the parts {', '.join(QUICK_PARTS)} within {QUICK_BUDGET_S:.0f} s (about 5 minutes)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}; --quick "
                             f"{QUICK_BUDGET_S:.0f}): a part gets what is left, and is skipped under "
                             f"{MIN_PART_S:.0f} s")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per part (default: each part's own)")
    parser.add_argument("--deps", action="store_true", help="only list segx's missing dependencies (exit 1 if any)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_requirements([*project_requirements(), *EXTRA_REQUIREMENTS])
    if args.deps:
        print(install_hint(missing) if missing else f"segx's dependencies are all importable by {sys.executable}.")
        return 1 if missing else 0
    info = probe_cuda()
    line = no_cuda_line(info)
    if line:
        print(line, flush=True)
        return NO_CUDA_EXIT
    gpus = info["gpus"]
    print(f"gpu-check: {len(gpus)} GPU(s): " + ", ".join(f"{g['index']}: {g['name']} ({g['memory_gb']} GB, sm "
          f"{g['capability']})" for g in gpus) + f"; torch {info['torch']}, CUDA {info['cuda_build']}", flush=True)
    facts = preflight(missing)
    print(preflight_line(facts), flush=True)
    if missing:
        print(install_hint(missing), flush=True)
    workdir = args.workdir.resolve()
    for old in [*PART_NAMES, "on-device", "bench.json", "logs"]:
        _remove(workdir / old)  # a stale run must not pass for this one
    parts = build_parts(workdir, len(gpus), bool(info.get("bf16")), compile_gap=toolchain_gap(facts))
    only = args.parts or (list(QUICK_PARTS) if args.quick else None)
    skipped = plan(parts, missing, only)
    budget = args.budget or (QUICK_BUDGET_S if args.quick else DEFAULT_BUDGET_S)
    return run_check(parts, skipped, args.json, workdir, budget, info, missing, facts, timeout=args.timeout)


def run_check(parts: Sequence[Part], skipped: dict[str, str], json_path: Path, workdir: Path, budget: float,
              info: dict[str, Any], missing: dict[str, str], facts: dict[str, Any] | None = None,
              timeout: float | None = None) -> int:
    """Run the parts within `budget` seconds, the JSON report rewritten after each; SIGTERM and SIGINT stop the
    running part's processes and end the run with the partial report. Returns the exit code."""
    planned = [p.name for p in parts if skipped.get(p.name) != "not in --parts"]
    start = time.perf_counter()

    def save(results: list[Result], running: str | None) -> dict[str, Any]:
        report = build_report(results, info, missing, workdir, time.perf_counter() - start, planned, running, facts)
        write_report(json_path, report)
        return report

    save([], planned[0] if planned else None)  # a report exists from the first second on
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        results = run_parts(parts, skipped, workdir / "logs", timeout=timeout, budget=budget,
                            done=lambda results, following: save(results, following))
    except Interrupted as interrupted:
        report = json.loads(json_path.read_text(encoding="utf-8"))
        print(f"\ngpu-check: stopped by {interrupted} after {report['seconds']:.0f} s; the parts that finished and "
              f"the one cut are in {json_path} (complete: false)", flush=True)
        return INCOMPLETE_EXIT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    report = save(results, None)
    print("\n" + format_table(results), flush=True)
    print(f"\nWrote {json_path} ({report['seconds']:.0f} s of a {budget:.0f} s budget; complete: "
          f"{str(report['complete']).lower()}); logs in {workdir / 'logs'}", flush=True)
    return exit_code(report)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
