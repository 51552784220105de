"""`python -m segx.bench.gpu_check [--json PATH]` (`make gpu-check`): one command that checks a CUDA machine.

Runs the CUDA tests, bf16 and 16-mixed training, a compiled network, device-resident data, evaluation, a
`hydra/launcher=gpus` sweep and `segx.bench --device cuda`, each in its own subprocess with a timeout, then prints
one table and writes it as JSON. Only the standard library is imported at the top, so that an interpreter that
lacks torch or Hydra still gets told what is missing.
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
PART_NAMES = ("cuda-tests", "train-bf16", "train-16", "compile", "on-device", "evaluate", "sweep", "bench")
NO_CUDA_EXIT = 2  # nothing could run here; 1 means a part failed

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
info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "available": torch.cuda.is_available()}
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
        return (f"gpu-check: no CUDA GPU is visible here (torch {info.get('torch')}, {build}, "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); run it on a machine "
                "with an NVIDIA GPU.")
    return None


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
    return True, ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no tests ran", counts


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


def judge_on_device(part: Part, log: str) -> tuple[bool, str, dict[str, Any]]:
    passed, figure, figures = judge_train(part, log)
    train_log = (part.output / "train.log").read_text(encoding="utf-8", errors="replace")
    served = re.search(r"data\.on_device: the train split \((\d+) images, (\d+) MB\) is served from (\S+)",
                       train_log)
    figures["train_split_served_from"] = served.group(3) if served else None
    if passed and not (served and served.group(3).startswith("cuda")):
        return False, "train.log does not say the train split is served from cuda", figures
    return passed, f"train split on {served.group(3)}; {figure}" if passed else figure, figures


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
                tests: Path | None = REPO / "tests" / "test_cuda.py") -> list[Part]:
    """The parts in the order they run, with their command lines (absolute paths under `workdir`)."""
    workdir = workdir.resolve()
    train = [python, "-m", "segx.cli.train"]
    common = ["model=unet_small", *shapes_overrides(workdir), "trainer=gpu", "trainer.enable_progress_bar=false",
              "logger=csv"]
    trains = training_needs()

    def training(name: str, extra: list[str], judge: Callable, timeout: float, skip: str | None = None) -> Part:
        overrides = [*common, "trainer.max_epochs=2", *extra, f"hydra.run.dir={workdir / name}"]
        return Part(name, [*train, *overrides], trains, timeout, judge, workdir / name, "train", overrides, skip=skip)

    parts = [Part("cuda-tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                  ("pytest", "tensorboard", *trains), 600, judge_tests,
                  skip=None if tests and tests.is_file() else f"{tests} is not here (no tests folder)")]
    no_bf16 = None if bf16 else "this GPU has no native bf16 (compute capability < 8.0)"
    parts.append(training("train-bf16", ["trainer.precision=bf16-mixed"], judge_train, 240, skip=no_bf16))
    parts.append(training("train-16", ["trainer.precision=16-mixed"], judge_train, 240))
    # run.compile: the run option's name since the model group holds constructor arguments only (was model.compile)
    parts.append(training("compile", ["run.compile=true"], judge_compile, 420))
    parts.append(training("on-device", ["data.on_device=true"], judge_on_device, 240))

    trained = "train-bf16" if bf16 else "train-16"
    evaluate = [f"ckpt={workdir / trained / 'checkpoints' / 'best.ckpt'}", "device=cuda",
                f"hydra.run.dir={workdir / 'evaluate'}"]
    parts.append(Part("evaluate", [python, "-m", "segx.cli.evaluate", *evaluate], trains, 180,
                      lambda p, log: judge_evaluate(p, log, workdir / trained), workdir / "evaluate", "evaluate",
                      evaluate, after=trained))

    jobs = 2 * max(gpus, 1)  # two jobs per GPU: with one GPU they share it through fractions
    sweep = [*common, "trainer.max_epochs=1", "hydra/launcher=gpus", f"seed={','.join(map(str, range(1, jobs + 1)))}",
             f"hydra.sweep.dir={workdir / 'sweep'}"]
    if gpus == 1:
        sweep.append("hydra.launcher.ray.remote.num_gpus=0.5")
    parts.append(Part("sweep", [*train, "-m", *sweep], ("ray", "hydra-ray-launcher", *trains), 420,
                      lambda p, log: judge_sweep(p, log, jobs, gpus), workdir / "sweep", "train", sweep))

    bench_json = workdir / "bench.json"
    parts.append(Part("bench", [python, "-m", "segx.bench", *bench_arguments(workdir)], trains, 480, judge_bench,
                      bench_json))
    return parts


def bench_arguments(workdir: Path) -> list[str]:
    """`segx.bench` flags small enough for a minute or two on one GPU (its own defaults time the study's sizes)."""
    return ["--device", "cuda", "--json", str(workdir / "bench.json"), "--workdir", str(workdir / "bench-data"),
            "--images", "256", "--predict-images", "128", "--steps", "10", "--warmup", "3", "--models", "unet",
            "unet_small", "--model-batch", "32", "--repeats", "1"]


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


def _stop(process: subprocess.Popen) -> None:
    """Stop the part's whole process group (Ray workers, compile workers), politely first."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(grace)
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


def run_part(part: Part, log_dir: Path, cwd: Path | None = None, timeout: float | None = None) -> Result:
    """Run one part in its own process group with a timeout; its output goes to `log_dir/<name>.log`."""
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
            _stop(process)  # Ctrl-C: take the part's processes down with this one
            raise
    seconds = time.perf_counter() - start
    result = Result(part.name, "fail", seconds, "", command=part.argv, log=str(log_path))
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if code is None:
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
              say: Callable[[str], None] = print, timeout: float | None = None) -> list[Result]:
    results: dict[str, Result] = {}
    for number, part in enumerate(parts, 1):
        reason = skipped.get(part.name)
        before = results.get(part.after) if part.after else None
        if reason is None and part.after and (before is None or before.status != "pass"):
            reason = f"needs {part.after}'s checkpoint ({before.status if before else 'not run'})"
        if reason is not None:
            results[part.name] = Result(part.name, "skipped", 0.0, reason, command=part.argv)
            say(f"[{number}/{len(parts)}] {part.name}: skipped, {reason}")
            continue
        say(f"[{number}/{len(parts)}] {part.name}: {' '.join(part.argv[1:4])} ... (log {log_dir / part.name}.log)")
        result = results[part.name] = run_part(part, log_dir, timeout=timeout)
        say(f"    {result.status} in {result.seconds:.1f} s: {result.figure}")
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
                 seconds: float) -> dict[str, Any]:
    return {"python": sys.executable, "torch": info.get("torch"), "cuda": info.get("cuda_build"),
            "gpus": info.get("gpus", []), "bf16": info.get("bf16"), "missing": missing, "workdir": str(workdir),
            "seconds": round(seconds, 1), "passed": not any(r.status == "fail" for r in results),
            "parts": [asdict(r) for r in results]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segx.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("gpu-check.json"), help="where the table goes as JSON")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/gpu-check"),
                        help="run directories, data and logs of the parts (emptied of old runs first)")
    parser.add_argument("--parts", nargs="*", choices=PART_NAMES, default=None, help="run only these parts")
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
    if missing:
        print(install_hint(missing), flush=True)
    workdir = args.workdir.resolve()
    for old in [*PART_NAMES, "bench.json", "logs"]:
        _remove(workdir / old)  # a stale run must not pass for this one
    parts = build_parts(workdir, len(gpus), bool(info.get("bf16")))
    start = time.perf_counter()
    results = run_parts(parts, plan(parts, missing, args.parts), workdir / "logs", timeout=args.timeout)
    report = build_report(results, info, missing, workdir, time.perf_counter() - start)
    print("\n" + format_table(results), flush=True)
    write_report(args.json, report)
    print(f"\nWrote {args.json} ({report['seconds']:.0f} s); logs in {workdir / 'logs'}", flush=True)
    return 0 if report["passed"] else 1


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


if __name__ == "__main__":
    sys.exit(main())
