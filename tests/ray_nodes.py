"""A real Ray cluster of several nodes on this machine, started with `ray start` as a user would (a head and raylets
that join it, each with a temp folder of its own), with token authentication on, and stopped without touching any
other Ray on the machine."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.ray_processes import TAG, OwnProcesses

RAY = str(Path(sys.executable).with_name("ray"))


def free_port(low: int = 6300, high: int = 6900) -> int:
    """A free port below Ray's worker port range (10002 up), where a head port would clash with its workers."""
    for port in range(low + os.getpid() % 100, high):
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port between {low} and {high}")


class RayNodes:
    """`ray start --head` on a port of its own plus `workers` raylets joining it, each declaring `gpus` simulated
    GPUs; the token is in `home`/.ray/auth_token (`env()` is a driver's environment that finds it). `stop()` ends
    only the processes these commands started (found by a tag in their environment)."""

    def __init__(self, root: Path, workers: int = 1, gpus: int = 1, cpus: int = 2) -> None:
        self.port, self.home, self.root, self.added = free_port(), root / "home", root, 0
        (self.home / ".ray").mkdir(parents=True, exist_ok=True)
        (self.home / ".ray" / "auth_token").write_text(os.urandom(16).hex())
        self.address = f"127.0.0.1:{self.port}"
        self.own = OwnProcesses(uuid.uuid4().hex)
        env = {**self.env(), "RAY_AUTH_MODE": "token", TAG: self.own.tag}
        common = [f"--num-gpus={gpus}", f"--num-cpus={cpus}", "--disable-usage-stats"]
        try:
            self._start([RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false",
                         f"--temp-dir={root / 'node0'}", *common], env)
            for n in range(1, workers + 1):  # a temp folder each: nodes sharing one would each forward every log
                self._start([RAY, "start", f"--address={self.address}", f"--temp-dir={root / f'node{n}'}", *common],
                            env)
        except BaseException:
            self.stop()
            raise

    def add_node(self, gpus: int = 1, cpus: int = 2, **env: str) -> KillableNode:
        """One more raylet joining the cluster, with processes of its own (and `env` added to their environment):
        `KillableNode.kill()` ends it alone."""
        self.added += 1  # its temp folder beside the others (a socket's path may not exceed 107 bytes)
        return KillableNode(self, self.root / f"added{self.added}", gpus, cpus, env)

    def env(self, **changes: str | None) -> dict[str, str]:
        """A driver's environment on this machine: the cluster's HOME (its token), no RAY_AUTH_MODE or RAY_ADDRESS
        unless `changes` set them (None removes a variable)."""
        env = {**os.environ, "HOME": str(self.home), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
        for name in ("RAY_AUTH_MODE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", TAG):
            env.pop(name, None)
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def _start(self, command: list[str], env: dict[str, str]) -> None:
        start(command, env, self.own)

    def running(self) -> dict[int, str]:
        """pid -> name of this cluster's processes still running."""
        return self.own.alive()

    def stop(self) -> None:
        """SIGKILL to every process of this cluster; waits until they are gone."""
        kill(self.own)


def start(command: list[str], env: dict[str, str], own: OwnProcesses) -> None:
    """Run a `ray start` command; the processes it leaves running are recorded in `own`."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    own.record()
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")


def kill(own: OwnProcesses) -> None:
    """SIGKILL to every process in `own`; waits until they are gone."""
    own.kill()
    deadline = time.monotonic() + 20
    while own.alive() and time.monotonic() < deadline:
        time.sleep(0.2)


class KillableNode:
    """A raylet that joined a `RayNodes` cluster and can be SIGKILLed alone, as a machine that dies would be."""

    def __init__(self, cluster: RayNodes, root: Path, gpus: int, cpus: int, env: dict[str, str]) -> None:
        self.own, self.temp_dir = OwnProcesses(uuid.uuid4().hex), root
        env = {**cluster.env(), **env, "RAY_AUTH_MODE": "token", TAG: self.own.tag}
        command = [RAY, "start", f"--address={cluster.address}", f"--temp-dir={root}", f"--num-gpus={gpus}",
                   f"--num-cpus={cpus}", "--disable-usage-stats"]
        try:
            start(command, env, self.own)
        except BaseException:
            kill(self.own)
            raise
        finally:
            cluster.own.known.update(self.own.known)  # the cluster's stop() ends it too

    @property
    def node_id(self) -> str:
        """Its Ray node id, as its raylet logged it."""
        for log in sorted(self.temp_dir.glob("session_*/logs/raylet.out")):
            found = re.search(r"Raylet of id, ([0-9a-f]{56})", log.read_text(errors="replace"))
            if found:
                return found.group(1)
        raise RuntimeError(f"no node id in the raylet log under {self.temp_dir}")

    def kill(self) -> None:
        """SIGKILL to the raylet and every process it started; waits until they are gone."""
        kill(self.own)
