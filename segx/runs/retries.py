"""A sweep job whose worker was lost (its process killed, its node dead): which Ray errors say so, and the line and
record the sweep's driver writes before it runs the job again."""

from __future__ import annotations

from pathlib import Path

from segx.core.errors import first_line
from segx.runs.record import epochs_recorded, record_retry


def lost_worker_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a task whose worker process or node went away; an error raised inside the job is not one."""
    from ray import exceptions

    return (exceptions.WorkerCrashedError, exceptions.NodeDiedError, exceptions.LocalRayletDiedError,
            exceptions.OutOfMemoryError)


def retry_line(job: int, run_dir: Path, why: BaseException | str, retry: int, retries: int, option: str) -> str:
    """Record that `job` lost its worker and waits for retry `retry` of `retries`; the console's line saying so,
    naming the node it ran on and the epochs it keeps."""
    said = first_line(why).split(". ")[0].rstrip(".")  # Ray's first sentence: the rest names the node again
    node_died = isinstance(why, BaseException) and type(why).__name__ == "NodeDiedError" or \
        ("node" in said.lower() and ("dead" in said.lower() or "died" in said.lower()))
    record = record_retry(run_dir, f"lost {'its node' if node_died else 'its worker'}: {said}", retry, retries) or {}
    attempts = record.get("attempts") or [{}]  # the attempt just closed: where the job ran
    node, host = attempts[-1].get("node"), attempts[-1].get("host")
    named = f"node {node} (host {host})" if node else f"host {host}" if host else "an unknown node"
    what = f"its node, {named}" if node_died else f"its worker process on {named}"
    epochs = epochs_recorded(record)
    keeps = f"it will resume after epoch {epochs} from its last.ckpt" if epochs else "it will start again"
    return (f"Job {job} lost {what}; Ray said: {said}. It is queued for retry {retry} of {retries} ({option}): "
            f"{keeps}.")
