"""Before a sweep's jobs go to a Ray cluster it joined: every node must run the same segx code and configs, see the
sweep directory (the jobs write their run directories there and the sweep reads them back) and the data at the
same paths. One small task per node checks it, so a node that cannot is named before any job starts on it."""

from __future__ import annotations

import hashlib
import logging
import socket
import uuid
from pathlib import Path
from typing import Any

from segx.core.config_dir import CONF_DIR
from segx.core.errors import ConfigError, first_line

log = logging.getLogger(__name__)

#: Seconds every node gets to start a worker and answer.
ANSWER_TIMEOUT_S = 120.0


def code_fingerprint() -> str:
    """A hash of segx's Python files and its configs, the same on every node that has the same code."""
    digest = hashlib.sha256()
    for root in (Path(__file__).resolve().parents[1], Path(CONF_DIR)):  # the segx package, conf/
        for path in sorted(root.rglob("*")):
            if path.suffix in (".py", ".yaml") and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def node_facts(marker: str, paths: dict[str, str]) -> dict[str, Any]:
    """What one node has: its host name, segx's code fingerprint, whether it reads the sweep's marker file, and
    which of `paths` (what → path) it lacks."""
    return {"host": socket.gethostname(), "code": code_fingerprint(), "sees_sweep_dir": Path(marker).is_file(),
            "missing": {what: path for what, path in paths.items() if not Path(path).exists()}}


def _problems(facts: dict[str, Any], code: str, sweep_dir: Path) -> list[str]:
    problems = []
    if facts["code"] != code:
        problems.append("its segx code or configs differ from this machine's (sync the checkout)")
    if not facts["sees_sweep_dir"]:
        problems.append(f"it does not see the sweep directory {sweep_dir} (put hydra.sweep.dir on storage every "
                        "node mounts at the same path)")
    problems += [f"{what} {path} does not exist there" for what, path in facts["missing"].items()]
    return problems


def check_nodes(sweep_dir: Path, paths: dict[str, Path]) -> int:
    """Run `node_facts` on every alive node of the joined cluster; raise ConfigError naming each node that lacks
    something, with the fix. `paths` (what → path) are checked only where they exist on this machine. Returns the
    number of nodes checked."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    marker = sweep_dir / f".node-check-{uuid.uuid4().hex[:8]}"
    marker.write_text("written by the sweep's driver; each node checks it can read it\n")
    wanted = {what: str(path) for what, path in paths.items() if Path(path).exists()}
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    task = ray.remote(num_cpus=0)(node_facts)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
                         name="segx node check").remote(str(marker), wanted): node for node in nodes}
    failures: list[str] = []
    left: list[str] = []  # nodes that died while they were checked (Ray marks a dead node only after a while)
    try:
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
        code = code_fingerprint()
        for ref in ready:
            name = refs[ref].get("NodeManagerAddress", "?")
            try:
                problems = _problems(ray.get(ref), code, sweep_dir)
            except ray.exceptions.RayError as error:  # e.g. segx not importable there
                if _node_left(refs[ref]["NodeID"], error):
                    left.append(f"{name} ({refs[ref]['NodeID'][:12]}…)")
                    continue
                problems = [f"a job cannot start there: {first_line(error)} (install the same environment)"]
            failures += [f"node {name}: " + "; ".join(problems)] if problems else []
        for ref in late:
            ray.cancel(ref, force=True)
            if _node_left(refs[ref]["NodeID"], None):
                left.append(f"{refs[ref].get('NodeManagerAddress', '?')} ({refs[ref]['NodeID'][:12]}…)")
            else:
                failures.append(f"node {refs[ref].get('NodeManagerAddress', '?')}: no answer within "
                                f"{ANSWER_TIMEOUT_S:.0f} s")
    finally:
        marker.unlink(missing_ok=True)
    if left:
        log.warning("%d node(s) of the Ray cluster left it while they were checked (dead or unreachable): %s; the "
                    "jobs run on the others", len(left), ", ".join(left))
    if failures:
        raise ConfigError(
            f"{len(failures)} of the {len(nodes)} nodes of the Ray cluster cannot run this sweep's jobs: "
            + " | ".join(failures) + ". Every node needs the same code and environment at the same path, the "
            "sweep directory on shared storage, and the data where data.root says. Nothing was launched.")
    return len(nodes) - len(left)


def _node_left(node_id: str, error: BaseException | None) -> bool:
    """Whether the node has left the cluster: Ray says its task cannot be placed there any more (the node is gone),
    or no longer lists it as alive."""
    import ray

    if isinstance(error, (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError)):
        return True
    return not any(node.get("NodeID") == node_id and node.get("Alive") for node in ray.nodes())


def job_paths(job_config: Any) -> dict[str, Path]:
    """The paths a job reads, as the nodes must find them: the launch directory and the data folders (relative
    ones resolved against it)."""
    paths = {"the launch directory": Path.cwd()}
    data = job_config.get("data") or {}
    for key in ("root", "cache_dir", "sbd_root"):
        value = data.get(key)
        if isinstance(value, str):
            paths[f"data.{key}"] = Path(value).expanduser().absolute()
    return paths
