"""The processes a Ray sweep of a test starts, found by a tag in their environment, and a sweep run in-process
that checks none of them outlives it."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from tests.in_process import run_in_process

ROOT = Path(__file__).resolve().parents[1]

# Every process a sweep test starts (the driver, Ray's raylet, GCS and workers) inherits this variable with a value
# of its own, so a test checks its own processes only, never another Ray on the machine.
TAG = "SEGX_TEST_PROCESS_TAG"


def _psutil() -> ModuleType:
    """psutil as Ray ships it (inside the ray package, not as a distribution of its own)."""
    import ray  # noqa: F401  # importing Ray puts its bundled psutil on sys.path

    return importlib.import_module("psutil")


class OwnProcesses:
    """The processes one test started: those whose environment carries its tag, and their descendants, recorded
    while they run (a Ray agent that renames itself loses the tag: setproctitle reuses the environment's memory)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.known: dict[int, tuple[float, str]] = {}  # pid -> (creation time, so a reused pid is not ours; name)

    def record(self) -> None:
        psutil = _psutil()
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG) != self.tag:
                    continue
                for own in [process, *process.children(recursive=True)]:
                    self.known[own.pid] = (own.create_time(), own.name())  # the name after its exec, if any
            except psutil.Error:  # gone meanwhile, a zombie, or another user's
                continue

    def alive(self) -> dict[int, str]:
        """pid -> name of those still running."""
        psutil = _psutil()
        self.record()
        running = {}
        for pid, (created, name) in self.known.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                    running[pid] = name
            except psutil.Error:
                continue
        return running

    def kill(self) -> None:
        psutil = _psutil()
        for pid in self.alive():
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                continue

    def wait_until_gone(self, timeout: float = 20.0) -> None:
        """A sweep's Ray instance ends with the sweep: no raylet or worker the test started is left behind."""
        deadline = time.monotonic() + timeout
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            self.kill()
            pytest.fail(f"processes of the sweep are still running after it ended: {left}")


def run_sweep(*overrides: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """`train.py -m ...` on Ray, run by its Hydra main in this process (a new interpreter would spend seconds
    importing what this one holds); Ctrl-C'd (instead of hanging) past `timeout` seconds, a bound for a hang that a
    machine several times slower than an idle one stays well within. Checks that the tag
    reached Ray's processes (so the check can see them) and that none of them outlives the sweep."""
    own, done = OwnProcesses(uuid.uuid4().hex), threading.Event()
    timed_out = threading.Event()

    def watch() -> None:  # records Ray's processes while they run; interrupts the sweep past its time
        deadline = time.monotonic() + timeout
        while not done.wait(0.5):
            own.record()
            if time.monotonic() > deadline and not timed_out.is_set():
                timed_out.set()
                os.kill(os.getpid(), signal.SIGINT)  # the launcher's Ctrl-C path: its jobs end, the sweep exits

    watcher = threading.Thread(target=watch, daemon=True)
    os.environ[TAG] = own.tag  # inherited by the Ray this sweep starts; run_in_process restores the environment
    try:
        watcher.start()
        result = run_in_process("train.py", "-m", *overrides, check=False)
    finally:
        done.set()
        watcher.join()
        os.environ.pop(TAG, None)
    if timed_out.is_set():
        own.kill()
        pytest.fail(f"the sweep did not end within {timeout:g} s:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    names = {name for _, name in own.known.values()}
    assert "raylet" in names, f"no raylet among the sweep's processes {sorted(names)}:\n{result.stderr[-3000:]}"
    own.wait_until_gone()
    return result


def interrupt_sweep(*overrides: str, ready: Callable[[], bool], timeout: float = 600,
                    wait: float = 300) -> subprocess.CompletedProcess:
    """`train.py -m ...` in a process of its own, Ctrl-C'd (SIGINT) once `ready()` holds; its output (stdout and
    stderr together) once it ended, and none of its processes left."""
    own = OwnProcesses(uuid.uuid4().hex)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0", TAG: own.tag}
    # A shell's background jobs (CI) ignore SIGINT, and Python keeps that: give the sweep the default handling back.
    with subprocess.Popen([sys.executable, str(ROOT / "train.py"), "-m", *overrides], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as process:
        deadline = time.monotonic() + timeout
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            own.record()
            time.sleep(0.2)
        assert process.poll() is None, "the sweep ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=wait)
    own.wait_until_gone()
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")
