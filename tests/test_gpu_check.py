"""`python -m segx.bench.gpu_check`'s CPU side: the no-CUDA exit, the dependency check, the runner, the table, and
command lines that segx's configs accept. (Its GPU parts run only on a machine with CUDA.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from segx.bench import gpu_check
from segx.bench.gpu_check import Part, Result

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check(*args: str, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # CUDA_VISIBLE_DEVICES="" hides any GPU, so the no-CUDA path is taken on every machine
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *python_flags, "-m", "segx.bench.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_without_cuda_it_says_so_in_one_line_and_exits_non_zero(tmp_path: Path) -> None:
    report = tmp_path / "gpu-check.json"
    result = _gpu_check("--json", str(report), "--workdir", str(tmp_path / "work"))
    assert result.returncode == gpu_check.NO_CUDA_EXIT != 0
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA GPU is visible here"), result.stdout
    assert "CUDA_VISIBLE_DEVICES=" in lines[0]
    assert not report.exists() and not (tmp_path / "work").exists()  # nothing ran


def test_it_imports_with_the_standard_library_only_and_names_what_is_missing() -> None:
    """`python -S` hides site-packages: no torch, no Hydra, yet the module runs and says so."""
    result = _gpu_check(python_flags=("-S",))
    assert result.returncode == gpu_check.NO_CUDA_EXIT, result.stderr
    assert result.stdout.count("\n") == 1 and "cannot use torch (No module named 'torch')" in result.stdout
    deps = _gpu_check("--deps", python_flags=("-S",))
    assert deps.returncode == 1, deps.stderr
    assert "torch (not installed)" in deps.stdout and "hydra-core (not installed)" in deps.stdout
    assert "pip install --no-index --find-links wheels" in deps.stdout
    pure = next(line for line in deps.stdout.splitlines() if "are pure Python" in line)
    assert "hydra-core" in pure and "omegaconf" in pure and "segmentation-models-pytorch" in pure
    assert "torch" not in pure.split(" are pure Python")[0].strip().split(", ")  # torch has compiled wheels


def test_the_requirements_are_read_from_pyproject() -> None:
    requirements = gpu_check.project_requirements(ROOT / "pyproject.toml")
    names = {gpu_check.canonical(r.split(">")[0].split("[")[0].split("<")[0]) for r in requirements}
    assert {"torch", "hydra-core", "omegaconf", "segmentation-models-pytorch", "ray"} <= names
    assert "pytest" not in names  # a dev extra, added by the check itself
    assert "ray" not in gpu_check.training_needs() and "hydra-core" in gpu_check.training_needs()


def test_the_dependency_check_names_a_missing_or_too_old_package(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("")
    (site / "fakepkg-1.2.dist-info").mkdir()
    (site / "fakepkg-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.2\n")
    (site / "bare_module.py").write_text("")  # importable without metadata (e.g. a torch on PYTHONPATH)
    path = [str(site)]
    check = gpu_check.missing_requirements
    assert check(["fakepkg>=1.0", "FakePkg[extra]>=1.1,<2", "bare-module>=9", "fakepkg==1.2.*"], path) == {}
    assert check(["fakepkg>=2"], path) == {"fakepkg": "1.2 installed, needs >=2"}
    assert check(["fakepkg>=1,<1.2"], path) == {"fakepkg": "1.2 installed, needs >=1,<1.2"}
    assert check(["segx-no-such-package>=1", "torch>=2.5"], path) == {
        "segx-no-such-package": "not installed", "torch": "not installed"}
    # this interpreter: the package that does not exist is named, what pytest runs on is present
    assert check(["segx-no-such-package>=1", "pytest>=8", "hydra-core>=1.3"]) == {
        "segx-no-such-package": "not installed"}


def test_a_missing_dependency_skips_the_parts_that_need_it(tmp_path: Path) -> None:
    parts = gpu_check.build_parts(tmp_path, gpus=1)
    assert [p.name for p in parts] == list(gpu_check.PART_NAMES)
    missing = gpu_check.missing_requirements(["ray>=2.10", "segx-no-such-package>=1"])
    missing["ray"] = "not installed"  # the venv holds Ray; this node pretends not to
    assert gpu_check.plan(parts, missing) == {"sweep": "needs ray (not installed)"}
    assert set(gpu_check.plan(parts, {"hydra-core": "not installed"})) == set(gpu_check.PART_NAMES)
    assert gpu_check.plan(parts, {}, only=["bench"]) == {n: "not in --parts" for n in gpu_check.PART_NAMES[:-1]}
    no_tests = gpu_check.build_parts(tmp_path, gpus=1, tests=tmp_path / "tests" / "test_cuda.py")
    assert "no tests folder" in gpu_check.plan(no_tests, {})["cuda-tests"]
    assert "native bf16" in gpu_check.plan(gpu_check.build_parts(tmp_path, gpus=1, bf16=False), {})["train-bf16"]


def _part(name: str, code: str, needs: tuple[str, ...] = (), after: str | None = None) -> Part:
    return Part(name, [sys.executable, "-c", code], needs, 60, lambda part, log: (True, log.splitlines()[-1], {}),
                after=after)


def test_parts_run_in_subprocesses_and_record_pass_fail_and_skipped(tmp_path: Path) -> None:
    parts = [
        _part("ok", "print('figure 42')"),
        _part("broken", "import sys; print('working'); sys.exit('RuntimeError: CUDA error: out of memory')"),
        _part("needs-broken", "print('never')", after="broken"),
        _part("needs-ok", "print('figure 7')", after="ok"),
        _part("absent", "print('never')", needs=("segx-no-such-package",)),
    ]
    missing = gpu_check.missing_requirements(["segx-no-such-package"])
    said: list[str] = []
    results = gpu_check.run_parts(parts, gpu_check.plan(parts, missing), tmp_path / "logs", say=said.append)
    status = {r.part: (r.status, r.figure) for r in results}
    assert status == {
        "ok": ("pass", "figure 42"),
        "broken": ("fail", "exit 1: RuntimeError: CUDA error: out of memory"),
        "needs-broken": ("skipped", "needs broken's checkpoint (fail)"),
        "needs-ok": ("pass", "figure 7"),
        "absent": ("skipped", "needs segx-no-such-package (not installed)"),
    }
    assert (tmp_path / "logs" / "broken.log").read_text().startswith("$ ")
    assert all(r.seconds > 0 for r in results if r.status != "skipped")
    assert len(said) == 2 * 3 + 2  # a start and an end line per part that ran, one line per skipped part


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_a_part_past_its_timeout_fails_and_its_processes_are_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    # the part starts a grandchild (as Ray and torch.compile do) and hangs
    code = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(300)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
            "time.sleep(300)")
    start = time.perf_counter()
    result = gpu_check.run_part(_part("hangs", code), tmp_path / "logs", timeout=3)
    assert result.status == "fail" and result.figure == "timed out after 3 s (started)"
    assert time.perf_counter() - start < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_the_table_and_the_json_report(tmp_path: Path) -> None:
    results = [Result("train-bf16", "pass", 12.345, "bf16-mixed, mIoU 0.412, epochs 3.10, 0.52 s",
                      {"val_miou": 0.412}, ["python", "-m", "segx.cli.train"], "logs/train-bf16.log"),
               Result("sweep", "skipped", 0.0, "needs ray (not installed)"),
               Result("bench", "fail", 100.0, "exit 1: RuntimeError: boom")]
    assert gpu_check.format_table(results).splitlines() == [
        "part        status   seconds  figure",
        "train-bf16  pass        12.3  bf16-mixed, mIoU 0.412, epochs 3.10, 0.52 s",
        "sweep       skipped        -  needs ray (not installed)",
        "bench       fail       100.0  exit 1: RuntimeError: boom",
    ]
    info = {"torch": "2.14.1", "cuda_build": "13.0", "bf16": True,
            "gpus": [{"index": 0, "name": "NVIDIA H200", "capability": "9.0", "memory_gb": 139.8}]}
    report = gpu_check.build_report(results, info, {"ray": "not installed"}, tmp_path, 112.34)
    path = tmp_path / "out" / "gpu-check.json"
    gpu_check.write_report(path, report)
    written = json.loads(path.read_text())
    assert written["passed"] is False and written["seconds"] == 112.3 and written["gpus"][0]["name"] == "NVIDIA H200"
    assert [(p["part"], p["status"]) for p in written["parts"]] == [
        ("train-bf16", "pass"), ("sweep", "skipped"), ("bench", "fail")]
    assert written["parts"][0]["figures"] == {"val_miou": 0.412} and written["missing"] == {"ray": "not installed"}
    assert [p.name for p in path.parent.iterdir()] == ["gpu-check.json"]  # no temp file left behind


def _jobs(overrides: list[str]) -> list[list[str]]:
    """What Hydra's sweeper expands a sweep's overrides into, one override list per job."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


@pytest.mark.parametrize("gpus", [1, 2])
def test_each_part_s_command_line_is_one_segx_accepts(tmp_path: Path, gpus: int) -> None:
    """Every override composes on the repo's conf/ (a renamed key fails here), the sweep expands to two jobs per
    GPU, and the bench's flags parse."""
    parts = {p.name: p for p in gpu_check.build_parts(tmp_path, gpus=gpus)}
    composed = {}
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        for name in ("train-bf16", "train-16", "compile", "loader", "evaluate"):
            part = parts[name]
            assert part.argv[1:3] == ["-m", f"segx.cli.{part.config}"] and part.argv[3:] == part.overrides
            composed[name] = compose(part.config, part.overrides, return_hydra_config=True)
        sweep = parts["sweep"]
        assert sweep.argv[1:4] == ["-m", "segx.cli.train", "-m"] and sweep.argv[4:] == sweep.overrides
        jobs = [compose("train", job, return_hydra_config=True) for job in _jobs(sweep.overrides)]
    assert composed["train-bf16"].trainer.precision == "bf16-mixed"
    assert composed["train-16"].trainer.precision == "16-mixed"
    assert composed["compile"].run.compile is True
    assert composed["loader"].data.on_device is False
    for cfg in composed.values():
        assert Path(cfg.hydra.run.dir).parent == tmp_path
    train = composed["train-bf16"]
    assert train.trainer.accelerator == "gpu" and train.data._target_ == "segx.data.ShapesDataModule"
    assert train.data.root == str(tmp_path / "shapes") and train.trainer.max_epochs == 2
    assert composed["evaluate"].ckpt == str(tmp_path / "train-bf16" / "checkpoints" / "best.ckpt")
    assert composed["evaluate"].device == "cuda" and parts["evaluate"].after == "train-bf16"
    assert len(jobs) == 2 * gpus and sorted(job.seed for job in jobs) == list(range(1, 2 * gpus + 1))
    assert all(job.trainer.max_epochs == 1 and job.trainer.accelerator == "gpu" for job in jobs)
    launcher = jobs[0].hydra.launcher
    assert launcher._target_.endswith("GpuLauncher") and launcher.ray.remote.num_gpus == (0.5 if gpus == 1 else 1)
    assert launcher.ray.init.address == "local"  # never a Ray that $RAY_ADDRESS or a `ray start` left here
    assert Path(jobs[0].hydra.sweep.dir) == tmp_path / "sweep"

    from segx.bench.cli import parse_args

    bench = parts["bench"].argv
    assert bench[1:3] == ["-m", "segx.bench"] and bench[3:5] == ["--device", "cuda"]
    args = parse_args(["--device", "cpu", *bench[5:]])  # the same flags (this machine may have no CUDA)
    assert args.json == tmp_path / "bench.json" and args.models == ["unet", "unet_small"] and args.steps == 10
    assert "precision" not in args.sections and "data_memory" not in args.sections  # CPU-only sections
    tests = parts["cuda-tests"]
    assert tests.argv[1:3] == ["-m", "pytest"] and Path(tests.argv[-1]) == ROOT / "tests" / "test_cuda.py"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_with_an_interpreter_builds_no_venv() -> None:
    # Not as a sub-make of `make test`: that one would print its directory and pass its own flags on.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "PY=python3"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "python3 -m segx.bench.gpu_check"
    assert ".venv" not in dry.stdout + dry.stderr and "pip" not in dry.stdout


@pytest.mark.slow
def test_the_training_judges_read_a_real_run_directory(trained_run: Path) -> None:
    """The figures come from the keys a real run writes; a CPU run is no pass for a GPU part."""
    part = Part("train-bf16", [], (), 1, gpu_check.judge_train, trained_run,
                overrides=["trainer.precision=bf16-mixed"])
    passed, figure, figures = gpu_check.judge_train(part, "")
    assert not passed and figure == "trained on cpu, not cuda; precision 32-true, not bf16-mixed"
    assert 0 < figures["val_miou"] <= 1 and len(figures["epoch_seconds"]) == 10
    assert figures["forward_gflops_per_image"] > 0
    passed, _, figures = gpu_check.judge_on_device(part, "")
    assert not passed and figures["train_split_served_from"] == "cpu"
    passed, figure, _ = gpu_check.judge_loader(part, "")
    assert not passed
    cpu_part = Part("train", [], (), 1, gpu_check.judge_train, trained_run)
    metrics = json.loads((trained_run / "metrics.json").read_text())
    metrics["accelerator"] = "cuda"  # the same run as a CUDA one would record it
    copy = trained_run.parent / "as-cuda"
    copy.mkdir(exist_ok=True)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    cpu_part.output = copy
    passed, figure, _ = gpu_check.judge_train(cpu_part, "")
    assert passed and figure.startswith("32-true, mIoU ")


def test_cheap_parts_come_first_and_quick_leaves_out_the_repeats(tmp_path: Path) -> None:
    parts = [p.name for p in gpu_check.build_parts(tmp_path, gpus=1)]
    assert parts[:2] == ["train-bf16", "evaluate"] and parts[-2:] == ["cuda-tests", "bench"]
    assert set(gpu_check.QUICK_PARTS) <= set(parts) and "cuda-tests" not in gpu_check.QUICK_PARTS
    gap = gpu_check.toolchain_gap({"c_compiler": None, "python_h": False, "python_h_path": "/x/Python.h",
                                   "libcuda": True})
    assert gap == ("torch.compile on CUDA needs a C compiler (cc, gcc or clang; or $CC), Python.h (/x/Python.h: "
                   "install the interpreter's development headers)")
    assert gpu_check.plan(gpu_check.build_parts(tmp_path, gpus=1, compile_gap=gap), {})["compile"] == gap
    facts = gpu_check.preflight({})
    assert facts["dev_shm_mb"] > 0 and "/dev/shm" in gpu_check.preflight_line(facts)


def test_the_no_cuda_line_gives_torch_s_reason_and_the_driver() -> None:
    info = {"torch": "2.14.1", "cuda_build": "13.0", "available": False,
            "warning": "CUDA initialization: The NVIDIA driver on your system is too old (found version 12040)."}
    line = gpu_check.no_cuda_line(info)
    assert "torch says: CUDA initialization: The NVIDIA driver on your system is too old" in line
    assert "NVIDIA driver " in line and line.count("\n") == 0


def test_a_run_of_skipped_parts_or_only_skipped_tests_does_not_pass(tmp_path: Path) -> None:
    part = Part("cuda-tests", [], (), 1, gpu_check.judge_tests)
    passed, figure, _ = gpu_check.judge_tests(part, "sss\n3 skipped in 0.12s\n")
    assert not passed and figure == "no test passed (3 skipped)"
    parts = [_part("a", "print('never')", needs=("segx-no-such-package",)),
             _part("b", "print('never')", needs=("segx-no-such-package",))]
    report_path = tmp_path / "gpu-check.json"
    code = gpu_check.run_check(parts, gpu_check.plan(parts, {"segx-no-such-package": "not installed"}), report_path,
                               tmp_path, 60, {}, {"segx-no-such-package": "not installed"})
    report = json.loads(report_path.read_text())
    assert code == gpu_check.INCOMPLETE_EXIT != 0
    assert report["passed"] is False and report["complete"] is False


def test_the_budget_skips_what_no_longer_fits_and_says_the_run_is_incomplete(tmp_path: Path) -> None:
    parts = [_part("first", "import time; time.sleep(2); print('figure 1')"), _part("second", "print('figure 2')")]
    report_path = tmp_path / "gpu-check.json"
    code = gpu_check.run_check(parts, {}, report_path, tmp_path, gpu_check.MIN_PART_S + 1, {}, {})
    report = json.loads(report_path.read_text())
    assert code == gpu_check.INCOMPLETE_EXIT
    assert [(p["part"], p["status"]) for p in report["parts"]] == [("first", "pass"), ("second", "skipped")]
    assert report["parts"][1]["figure"].startswith("the time budget") and report["passed"] is True
    assert report["complete"] is False and report["running"] is None


_INTERRUPTED_RUN = """
import sys
from pathlib import Path
from segx.bench import gpu_check
from segx.bench.gpu_check import Part

work = Path(sys.argv[1])
judge = lambda part, log: (True, log.splitlines()[-1], {})
spawn = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
         "time.sleep(300)']); open(%r, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(300)"
         % str(work / "child.pid"))
parts = [Part("quick", [sys.executable, "-c", "print('figure 1')"], (), 60, judge),
         Part("long", [sys.executable, "-c", spawn], (), 300, judge),
         Part("never", [sys.executable, "-c", "print('figure 3')"], (), 60, judge)]
sys.exit(gpu_check.run_check(parts, {}, work / "gpu-check.json", work, 600, {}, {}))
"""


def test_sigterm_mid_part_leaves_a_partial_report_and_no_part_process(tmp_path: Path) -> None:
    """What `timeout` or the end of a lease sends: the running part's process group goes, the report stays."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", _INTERRUPTED_RUN, str(tmp_path)], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        deadline = time.monotonic() + 60
        while not (tmp_path / "child.pid").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        report = json.loads((tmp_path / "gpu-check.json").read_text())
        assert report["running"] == "long" and [p["part"] for p in report["parts"]] == ["quick"]  # written as it goes
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == gpu_check.INCOMPLETE_EXIT, output
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert [(p["part"], p["status"]) for p in report["parts"]] == [("quick", "pass"), ("long", "cut")]
    assert report["parts"][1]["figure"] == "cut by SIGTERM (its processes stopped)"
    assert report["complete"] is False and "stopped by SIGTERM" in output
    grandchild = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)
