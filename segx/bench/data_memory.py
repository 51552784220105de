"""`data_memory`: what a cached split costs a machine when 1 and then 4 jobs train from it at once.

Each job is a process that does what a training job does with its data (load the cached train split, count its
class frequencies for the loss, draw one epoch of normalised batches) and then waits until every job of its round
has done so, so that the memory they hold is measured while they run side by side. A job's data memory is the
private memory it gained (its own copies) plus its share of the cache file's mapped pages (PSS: a page mapped by
4 processes counts a quarter in each), so the jobs' figures add up to what the node spends on the data. Target:
4 jobs ≤ 1.3 × one job.

`python -m segx.bench.data_memory job <spec.json>` is one job (the bench starts them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from segx.data.shapes import write_shapes_dataset


def _memory_kb() -> dict[str, int]:
    """This process' memory from /proc/self/smaps_rollup (kB): Pss, Rss, Private_Dirty, ..."""
    lines = Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]
    return {line.split(":")[0]: int(line.split()[1]) for line in lines}


def _cache_pss_kb(cache_dir: str) -> int:
    """This process' share (PSS, kB) of the pages it maps from files under `cache_dir`."""
    total, counting = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            counting = len(fields) >= 6 and fields[5].startswith(cache_dir)
        elif counting and fields[:1] == ["Pss:"]:
            total += int(fields[1])
    return total


def _data_mb(before: dict[str, int], cache_dir: str) -> float:
    return (_memory_kb()["Private_Dirty"] - before["Private_Dirty"] + _cache_pss_kb(cache_dir)) / 1024


def job(spec_file: str) -> None:
    """One job of a round: load, count, one epoch; report; wait for the round's release file."""
    spec = json.loads(Path(spec_file).read_text())
    from segx.data import ShapesDataModule

    before = _memory_kb()
    start = time.perf_counter()
    datamodule = ShapesDataModule(**spec["data"])
    datamodule.load_split("train")
    load_seconds = time.perf_counter() - start
    datamodule.class_frequencies()
    for batch in datamodule.train_dataloader():
        datamodule.prepare_batch(batch, training=True)
    cache_dir = str(Path(spec["data"]["cache_dir"]).resolve())
    report = {"data_mb": _data_mb(before, cache_dir),
              "private_mb": (_memory_kb()["Private_Dirty"] - before["Private_Dirty"]) / 1024,
              "load_seconds": load_seconds}
    Path(spec["report"]).write_text(json.dumps(report))
    release = Path(spec["release"])
    while not release.exists():  # held until every job of the round has reported
        time.sleep(0.05)
    # Measured again with the whole round alive, so the cache's pages are split among the jobs that map them.
    Path(spec["report"]).write_text(json.dumps({**report, "data_mb": _data_mb(before, cache_dir)}))


def _round(jobs: int, data: dict[str, Any], workdir: Path) -> list[dict[str, float]]:
    """`jobs` job processes at once; each one's figures, measured while all of them were alive."""
    release = workdir / f"release-{jobs}"
    reports = [workdir / f"report-{jobs}-{index}.json" for index in range(jobs)]
    processes = []
    for report in reports:
        spec = workdir / f"{report.stem}.spec.json"
        spec.write_text(json.dumps({"data": data, "report": str(report), "release": str(release)}))
        processes.append(subprocess.Popen([sys.executable, "-m", "segx.bench.data_memory", "job", str(spec)]))
    try:
        while not all(r.exists() for r in reports):
            if any(p.poll() not in (None, 0) for p in processes):
                raise RuntimeError("a data_memory job failed; run it alone to see why: python -m "
                                   f"segx.bench.data_memory job {workdir / (reports[0].stem + '.spec.json')}")
            time.sleep(0.1)
        time.sleep(1.0)  # let every job settle at its barrier
        release.touch()
        for process in processes:
            process.wait(timeout=600)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return [json.loads(r.read_text()) for r in reports]


def data_memory(workdir: Path, images: int = 2000, size: int = 256) -> dict[str, Any]:
    """One job's data memory, 4 concurrent jobs' (PSS, summed), their ratio, the cache's size and load times."""
    root = workdir / "data-memory-shapes"
    write_shapes_dataset(root, num_train=images, num_val=8, seed=0, min_size=96, max_size=160)
    with tempfile.TemporaryDirectory(prefix="segx-bench-memory-", dir=workdir) as tmp:
        data = {"root": str(root), "num_train": images, "num_val": 8, "min_size": 96, "max_size": 160,
                "image_size": size, "batch_size": 16, "cache_dir": str(Path(tmp) / "cache")}
        from segx.data import ShapesDataModule

        start = time.perf_counter()
        ShapesDataModule(**data).load_split("train")  # built once, before the jobs: they only read it
        build_seconds = time.perf_counter() - start
        cache_mb = sum(p.stat().st_size for p in (Path(tmp) / "cache").glob("train-*.pt")) / 2**20
        one, four = _round(1, data, Path(tmp)), _round(4, data, Path(tmp))
    one_mb, four_mb = one[0]["data_mb"], sum(r["data_mb"] for r in four)
    return {"ratio": four_mb / one_mb, "one_job_mb": one_mb, "four_jobs_mb": four_mb, "cache_mb": cache_mb,
            "private_mb_per_job": [r["private_mb"] for r in four], "load_seconds": [r["load_seconds"] for r in four],
            "one_job_load_seconds": one[0]["load_seconds"], "cache_build_seconds": build_seconds, "images": images,
            "image_size": size}


if __name__ == "__main__" and sys.argv[1:2] == ["job"]:
    job(sys.argv[2])
