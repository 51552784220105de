"""Speed figures: `python -m segx.bench [--models unet unet_small ...] [--batch 8] [--size 128] [--device cpu]`.

Measures, per model config in conf/model/, the parameter count and the wall time of one training
step's forward + backward (and of inference) on random inputs, plus how fast a cached split loads.
Performance targets are checked against these figures, never in timed unit tests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from segx.models import parameter_counts

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def model_names() -> list[str]:
    """Every model config shipped in conf/model/."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(name: str, batch: int = 8, size: int = 128, device: str = "cpu", repeats: int = 3,
               channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Forward+backward and inference seconds per batch (median of `repeats`, after one warm-up)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
    target = torch.device(device)
    net = instantiate(cfg.model).to(target)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    x = torch.randn(batch, 3, size, size, device=target).to(memory_format=memory_format)
    y = torch.randint(0, 21, (batch, size, size), device=target)

    def step() -> None:
        with torch.autocast(target.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(target.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            net(x).argmax(1)

    results: dict[str, Any] = {"model": name, **parameter_counts(net), "batch": batch, "size": size,
                               "device": str(target)}
    for label, fn, mode in (("train_step_s", step, True), ("inference_s", infer, False)):
        net.train(mode)
        fn()
        _sync(target)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            _sync(target)
            times.append(time.perf_counter() - start)
        results[label] = statistics.median(times)
    results["train_images_per_s"] = batch / results["train_step_s"]
    return results


def time_cache_load(num_train: int = 200, image_size: int = 128) -> dict[str, float]:
    """Seconds to build, then reload, the cache of a generated shapes split."""
    from segx.data import ShapesDataModule

    with tempfile.TemporaryDirectory() as root:
        dm = ShapesDataModule(root=root, num_train=num_train, num_val=8, image_size=image_size)
        dm.prepare_source()
        start = time.perf_counter()
        dm.load_split("train")
        built = time.perf_counter() - start
        start = time.perf_counter()
        ShapesDataModule(root=root, num_train=num_train, num_val=8, image_size=image_size).load_split("train")
        return {"cache_build_s": built, "cache_reload_s": time.perf_counter() - start, "images": num_train}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m segx.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="model configs (default: all in conf/model)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    names = args.models or model_names()
    unknown = sorted(set(names) - set(model_names()))
    if unknown:
        parser.error(f"unknown model config(s) {unknown}; choose from {model_names()}")
    rows = []
    print(f"{'model':<16}{'trainable':>14}{'train step s':>14}{'infer s':>10}{'img/s':>9}   "
          f"(batch {args.batch}, {args.size}px, {args.device})", flush=True)
    for name in names:
        row = time_model(name, args.batch, args.size, args.device, args.repeats, args.channels_last,
                         torch.bfloat16 if args.bf16 else None)
        rows.append(row)
        print(f"{name:<16}{row['trainable']:>14,}{row['train_step_s']:>14.3f}{row['inference_s']:>10.3f}"
              f"{row['train_images_per_s']:>9.1f}", flush=True)
    cache = time_cache_load(image_size=args.size)
    print(f"cache: built {cache['images']} images in {cache['cache_build_s']:.2f}s, "
          f"reloaded in {cache['cache_reload_s']:.3f}s")
    if args.json:
        args.json.write_text(json.dumps({"models": rows, "cache": cache}, indent=2))
    return rows


if __name__ == "__main__":
    main()
