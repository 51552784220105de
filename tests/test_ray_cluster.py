"""Sweeps that join a Ray cluster as users start one: a head and a second raylet from `ray start`, token
authentication on, each node with one simulated GPU; the shipped launcher and sweeper configs join it as they are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from segx.runs.node_check import _problems, node_facts
from segx.runs.ray_cluster import cluster_address
from segx.runs.record import read_record
from segx.runs.status import COMPLETED
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES
from tests.faults import HOLD_ENV
from tests.ray_nodes import RayNodes, free_port
from tests.ray_processes import TAG, OwnProcesses
from tests.test_sweep_launchers import overlap, records

pytestmark = pytest.mark.slow
ONE_EPOCH = ["trainer.max_epochs=1", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    cluster = RayNodes(tmp_path_factory.mktemp("cluster"), workers=1, gpus=1, cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()
        assert not cluster.running(), f"processes of the test's cluster outlived it: {cluster.running()}"


def sweep(env: dict[str, str], *overrides: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """`train.py -m ...` in a process of its own (its own HOME, so its own Ray token), output merged; none of the
    processes it started itself outlives it (the jobs' workers belong to the cluster's raylets)."""
    own = OwnProcesses(uuid.uuid4().hex)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *overrides], cwd=ROOT,
                            env={**env, TAG: own.tag}, capture_output=True, text=True, timeout=timeout)
    own.wait_until_gone()
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout + result.stderr, "")


def test_a_gpus_sweep_joins_the_cluster_with_the_shipped_config(nodes: RayNodes, shapes_root: Path,
                                                                 tmp_path: Path) -> None:
    result = sweep(nodes.env(), *TINY_MODEL, *TINY_SHAPES, *QUIET, *ONE_EPOCH, f"data.root={shapes_root}",
                   "trainer.limit_train_batches=4", "optimizer=sgd,adam", "seed=1,2", "hydra/launcher=gpus",
                   f"hydra.launcher.ray.init.address={nodes.address}", f"hydra.sweep.dir={tmp_path}")
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    # the keys of a Ray the sweep would start are left out, in one line; the token came from ~/.ray/auth_token
    assert re.search(r"Joining the Ray cluster at [\d.]+:\d+: it keeps the resources it was started with, so "
                     r"hydra.launcher.ray.init.object_store_memory, hydra.launcher.ray.init.include_dashboard are "
                     r"not applied", output), output[-3000:]
    assert f"Using the Ray authentication token from {nodes.home / '.ray' / 'auth_token'}" in output
    assert "its 2 node(s) run this code and see the sweep directory and the data" in output
    jobs = records(tmp_path)
    assert len(jobs) == 4 and all(j["status"] == COMPLETED for j in jobs)
    # One GPU per node: two jobs at once, both on GPU 0, so on different nodes.
    assert all(j["devices"] == "0" for j in jobs), [j["devices"] for j in jobs]
    assert any(overlap(a, b) for i, a in enumerate(jobs) for b in jobs[i + 1:]), "no two jobs ran at the same time"
    # The console: per job one start line, one line per epoch and one end line; the config tree stays in train.log.
    for n in range(4):
        lines = [line for line in output.splitlines() if f"(job {n} pid=" in line and "[INFO]" in line]
        assert len(lines) == 2 and f"Job {n} · launcher gpus" in lines[0] and "Epoch 1/1" in lines[1], "\n".join(
            line for line in output.splitlines() if f"(job {n} pid=" in line)  # warnings may come besides
        assert f"Job {n} completed · best val/miou" in output
        assert "Config:" in (tmp_path / str(n) / "train.log").read_text()
    assert "Config:" not in output and "Trainable params" not in output
    assert len(output.splitlines()) < 40, output


def test_a_wrong_token_is_one_paragraph_and_starts_nothing(nodes: RayNodes, shapes_root: Path,
                                                           tmp_path: Path) -> None:
    wrong = tmp_path / "wrong_token"
    wrong.write_text(os.urandom(16).hex())
    started = time.monotonic()
    result = sweep(nodes.env(RAY_AUTH_TOKEN_PATH=str(wrong)), *TINY_MODEL, *TINY_SHAPES, *QUIET, *ONE_EPOCH,
                   f"data.root={shapes_root}", "seed=1,2", "hydra/launcher=gpus",
                   f"hydra.launcher.ray.init.address={nodes.address}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode == 2, result.stdout[-3000:]
    assert time.monotonic() - started < 60  # no retry loop
    assert "refused this sweep's authentication token: the token read from $RAY_AUTH_TOKEN_PATH is not the " \
           "cluster's" in result.stdout
    assert "`ray get-auth-token` prints it" in result.stdout and "Traceback" not in result.stdout
    assert "raylet" in set(nodes.running().values())  # the cluster is left as it was, and no job started
    assert not list((tmp_path / "sweep").glob("*/metrics.json"))


_JOIN = """
import logging, sys
from pathlib import Path
from omegaconf import OmegaConf
from hydra_plugins.segx_gpus_launcher.gpus_launcher import join_cluster

logging.basicConfig(level=logging.INFO, format="%(message)s")
init = {"address": sys.argv[1], "num_gpus": None, "include_dashboard": False, "object_store_memory": 78643200}
join_cluster(init, sys.argv[2], Path(sys.argv[3]), OmegaConf.create({"data": {"root": sys.argv[3]}}), True)
print("joined")
"""


def join(env: dict[str, str], address: str, prefix: str, sweep_dir: Path) -> subprocess.CompletedProcess:
    """What a sweep does before its first job (start_or_join, then the node check), without the rest of a sweep."""
    own = OwnProcesses(uuid.uuid4().hex)
    result = subprocess.run([sys.executable, "-c", _JOIN, address, prefix, str(sweep_dir)], cwd=ROOT,
                            env={**env, TAG: own.tag}, capture_output=True, text=True, timeout=120)
    own.wait_until_gone()
    return subprocess.CompletedProcess(result.args, result.returncode, result.stdout + result.stderr, "")


def test_a_missing_token_names_where_it_goes(nodes: RayNodes, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    result = join({**nodes.env(), "HOME": str(home)}, nodes.address, "hydra.sweeper", tmp_path)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "no token was found here" in result.stdout and "export RAY_AUTH_MODE=token" in result.stdout
    assert "joined" not in result.stdout
    joined = join(nodes.env(), nodes.address, "hydra.sweeper", tmp_path)  # the same with the token at hand
    assert joined.returncode == 0 and "joined" in joined.stdout, joined.stdout[-3000:]
    assert "its 2 node(s) run this code" in joined.stdout


def test_an_address_where_nothing_answers_is_one_paragraph(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = join(env, address, "hydra.launcher", tmp_path)
    assert result.returncode == 2 and time.monotonic() - started < 60, result.stdout[-3000:]
    port = address.rsplit(":", 1)[1]  # Ray names 127.0.0.1 by the machine's address
    assert re.search(rf"Cannot join the Ray cluster at [\d.]+:{port} \(hydra.launcher.ray.init.address={address}\): "
                     "nothing answers there", result.stdout), result.stdout[-3000:]
    assert "hydra.launcher.ray.init.address=local" in result.stdout and "Traceback" not in result.stdout


def test_ray_address_decides_between_joining_and_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's own rule, relied on to tell a join from a start: $RAY_ADDRESS wins over null and "auto"; local never
    joins."""
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6399")
    assert cluster_address({"address": None}) == "10.1.2.3:6399"
    assert cluster_address({"address": "auto"}) == "10.1.2.3:6399"
    assert cluster_address({"address": "local"}) is None
    assert cluster_address({"address": "10.0.0.7:6380"}) == "10.0.0.7:6380"


def test_a_node_that_lacks_something_is_told_what(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    facts = node_facts(str(sweep_dir / "absent-marker"), {"data.root": str(tmp_path / "absent")})
    problems = _problems({**facts, "code": "another"}, "mine", sweep_dir)
    assert problems[0].startswith("its segx code or configs differ")
    assert f"it does not see the sweep directory {sweep_dir}" in problems[1]
    assert problems[2] == f"data.root {tmp_path / 'absent'} does not exist there"


# -- a node that dies mid-sweep ------------------------------------------------------------------------------

HOLD = ["+callbacks.hold._target_=tests.faults.HoldOnMarkedNode"]  # a job on the node to kill holds in epoch 2


def sweep_killing_a_node(nodes: RayNodes, sweep_dir: Path, *overrides: str,
                         timeout: float = 600) -> tuple[subprocess.CompletedProcess, int]:
    """A sweep on the cluster plus one more node (1 simulated GPU), where a job holds as its second epoch starts
    (tests.faults.HoldOnMarkedNode) and the node is then SIGKILLed. Returns the finished sweep and the number of the
    job hit."""
    node = nodes.add_node(**{HOLD_ENV: "1"})
    node_id, own = node.node_id, OwnProcesses(uuid.uuid4().hex)
    command = [sys.executable, str(ROOT / "train.py"), "-m", *overrides, *HOLD, f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen(command, cwd=ROOT, env={**nodes.env(RAY_ADDRESS=nodes.address), TAG: own.tag},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    hit, deadline = None, time.monotonic() + timeout
    try:
        while hit is None and process.poll() is None and time.monotonic() < deadline:
            for run_dir in sweep_dir.glob("*/metrics.json"):
                record = read_record(run_dir.parent) or {}
                attempts = record.get("attempts") or [{}]
                if attempts[-1].get("node") == node_id and len(record.get("history") or []) == 1:
                    hit = int(run_dir.parent.name)
                    node.kill()
                    break
            time.sleep(0.1)
        output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
        node.kill()
        own.wait_until_gone()
    (sweep_dir / "console.txt").write_text(output)  # for a look after the test
    assert hit is not None, f"no job of the sweep ran on the node to kill:\n{output[-4000:]}"
    return subprocess.CompletedProcess(command, process.returncode, output, ""), hit


def test_a_node_lost_under_the_gpus_launcher_is_named_and_its_job_resumes_on_another(
        nodes: RayNodes, shapes_root: Path, tmp_path: Path) -> None:
    """Three jobs on three 1-GPU nodes; the node of one is killed after its first epoch. The console names the job,
    the node and the retry; the job resumes on a surviving node from its last.ckpt, with no epoch lost or trained
    twice, and its record keeps its first start and lists both attempts."""
    sweep_dir = tmp_path / "sweep"
    command = [*TINY_MODEL, *TINY_SHAPES, "trainer.max_epochs=3", "trainer.limit_train_batches=4",
               "trainer.limit_val_batches=1", f"data.root={shapes_root}", "seed=1,2,3", "hydra/launcher=gpus"]
    result, hit = sweep_killing_a_node(nodes, sweep_dir, *command)
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    assert re.search(rf"Job {hit} lost its (node|worker process)\S* .*node [0-9a-f]{{56}} \(host .*\).*It is queued "
                     rf"for retry 1 of 3 \(hydra.launcher.ray.remote.max_retries\): it will resume after epoch 1 "
                     "from its last.ckpt", output), output[-5000:]
    assert re.search(rf"\(job {hit} pid=\d+.*Job {hit} resumes after epoch 1 from .*last.ckpt \(attempt 2, status "
                     r"was retrying\)", output), output[-5000:]
    record = read_record(sweep_dir / str(hit))
    assert record["status"] == COMPLETED and [e["epoch"] for e in record["history"]] == [0, 1, 2]
    first, second = record["attempts"]
    assert first["ended"].startswith("lost") and second["ended"] == COMPLETED
    assert first["node"] != second["node"] and second["from_epoch"] == 1
    assert record["started_at"] == first["started_at"] < second["started_at"]
    assert "retry" not in record and "Fatal Python error" not in output
    assert all(r["status"] == COMPLETED for r in (read_record(sweep_dir / str(n)) for n in range(3)))
    assert re.search(r"3 jobs, 3 completed, 0 failed, 1 retried after a lost worker", output), output[-3000:]
    # The same command again, at once: the dead node may not be marked dead yet (Ray waits for missed heartbeats),
    # and is then passed over by the node check. The driver skips the three completed jobs without starting a worker.
    again = sweep(nodes.env(RAY_ADDRESS=nodes.address), *command, *HOLD, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "Continuing the sweep in" in again.stdout and "changed shared settings" not in again.stdout
    assert all(f"Job {n} completed earlier in {sweep_dir / str(n)}: skipped" in again.stdout for n in range(3))
    assert not re.search(r"\(job \d pid=", again.stdout), again.stdout[-3000:]


def test_a_halving_trial_whose_node_dies_before_its_rung_is_retried_and_judged_there(
        nodes: RayNodes, shapes_root: Path, tmp_path: Path) -> None:
    """A tune search joins the cluster named by $RAY_ADDRESS with the shipped config: 4 trials of successive halving
    (one rung, after epoch 2, η 3) on three 1-GPU nodes. The node of one trial is killed after its first epoch; Tune
    retries it on a surviving node, the rung waits for it and is decided over all 4 trials, and the trial's record
    lists both attempts."""
    sweep_dir = tmp_path / "sweep"
    result, hit = sweep_killing_a_node(
        nodes, sweep_dir, *TINY_MODEL, *TINY_SHAPES, "trainer.max_epochs=3", "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=1", f"data.root={shapes_root}", "optimizer.lr=0.01,0.02,0.05,0.1",
        "hydra/sweeper=tune", "hydra.sweeper.scheduler=sha", "hydra.sweeper.rungs=[2]")
    output = result.stdout
    assert result.returncode == 0, output[-5000:]
    assert "hydra.sweeper.ray.init.object_store_memory" in output and "not applied" in output
    assert "its 3 node(s) run this code" in output
    assert re.search(rf"Job {hit} lost its (node|worker process).*It is queued for retry 1 of 3 "
                     r"\(hydra.sweeper.ray.remote.max_retries\)", output), output[-5000:]
    assert "Successive halving, rung 1 (epoch 2): 1 of 4 trial(s) go on" in output, output[-5000:]
    state = json.loads((sweep_dir / ".tune" / "segx-halving.json").read_text())
    assert all("0" in job["scores"] for job in state["jobs"].values()), state  # all 4 judged at the rung
    record = read_record(sweep_dir / str(hit))
    assert [e["epoch"] for e in record["history"]][:2] == [0, 1]
    assert record["attempts"][0]["ended"].startswith("lost") and record["attempts"][1]["from_epoch"] == 1
    assert record["started_at"] == record["attempts"][0]["started_at"]
    assert "Fatal Python error" not in output and "SIGABRT" not in output
    assert re.search(r"4 jobs, 1 completed, 0 failed, 3 stopped early by the scheduler, 1 retried after a lost "
                     "worker", output), output[-3000:]
