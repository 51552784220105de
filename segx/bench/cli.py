"""`python -m segx.bench [--json PATH] [--device cpu|cuda] [--models ...] [--sections ...]`: a benchmark, not a test.

Every ratio is measured side by side in the same process. The defaults finish in under 10 minutes on a
2-core CPU; on a GPU they use the study's full sizes (1,464 training and 1,449 val images).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from segx.bench.data_speed import data_speedup, voc_sized_tree
from segx.bench.loop import loop_comparison, run_config
from segx.bench.models import channels_last_speedup, model_names, model_row, predict_val_seconds
from segx.bench.peak import device_peak
from segx.core.files import write_json_atomic
from segx.training.runtime import precision_for

SECTIONS = ("data", "data_memory", "loop", "predict", "models", "memory_format", "precision")
# Minutes of training (the 12-configuration grid with 3 seeds, then real searches): only with --sections search.
EXTRA_SECTIONS = ("search",)
STUDY_UNETS = ("unet", "unet_medium", "unet_small")
# (figure, comparison, target) per device type, as issue 10 set them; a dotted figure reads into a dict.
TARGETS = {
    "cpu": [("data_speedup", ">=", 20.0), ("lightning_overhead", "<=", 1.05), ("train_peak_fraction", ">=", 0.65),
            ("infer_peak_fraction", ">=", 0.80), ("search_epoch_fraction", "<=", 0.4),
            ("search_p_regret_le_noise", ">=", 0.9), ("bf16_label_agreement", ">=", 0.995),
            ("bf16_miou_difference", "<=", 0.002), ("data_memory_ratio", "<=", 1.3)],
    "cuda": [("data_speedup", ">=", 20.0), ("lightning_overhead", "<=", 1.05),
             ("unet_train_images_per_second", ">=", 3000.0), ("predict_val_seconds.unet", "<", 0.25),
             ("search_epoch_fraction", "<=", 0.4), ("search_p_regret_le_noise", ">=", 0.9),
             ("data_memory_ratio", "<=", 1.3)],
}


def _defaults(cuda: bool) -> dict[str, int]:
    """Sizes that finish in minutes: a CPU times subsets, a GPU the study's full splits."""
    if cuda:
        return {"images": 1464, "predict_images": 1449, "steps": 50, "warmup": 10, "model_batch": 64}
    return {"images": 512, "predict_images": 64, "steps": 8, "warmup": 2, "model_batch": 8}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segx.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--json", type=Path, default=Path("bench.json"), help="where the results go")
    parser.add_argument("--models", nargs="*", default=None, help="conf/model files for the models table (all)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS + EXTRA_SECTIONS,
                        help=f"default: {' '.join(SECTIONS)}; search (minutes) only when named")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="a folder holding VOCdevkit/VOC2012 (real VOC); default: shapes at VOC's image sizes")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where generated data and caches go (default ~/.cache/segx/bench)")
    parser.add_argument("--search-orders", type=int, default=200,
                        help="trial orders the search section replays each scheduler over, per seed")
    parser.add_argument("--size", type=int, default=128, help="training image size (the study's 128)")
    parser.add_argument("--batch", type=int, default=8, help="batch of the loop comparison and peak fractions")
    parser.add_argument("--data-batch", type=int, default=16, help="batch of the data comparison")
    parser.add_argument("--network", default="unet_medium", help="network of the loop comparison")
    parser.add_argument("--images", type=int, default=None, help="training images of the data comparison")
    parser.add_argument("--predict-images", type=int, default=None,
                        help="val images timed for predict_val_seconds (scaled to 1,449 when fewer)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per loop")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument("--model-batch", type=int, default=None, help="batch of the models table")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the fastest counts) per model figure")
    parser.add_argument("--precision-ckpt", type=Path, default=None,
                        help="precision section: a trained checkpoint to compare bf16 with fp32 on (default: the "
                             "demo's network, trained on shapes for --precision-epochs)")
    parser.add_argument("--precision-epochs", type=int, default=8, help="epochs of the precision section's network")
    parser.add_argument("--memory-images", type=int, default=2000,
                        help="data_memory section: training images of its generated cache (2000 at 256 px: 524 MB)")
    parser.add_argument("--memory-size", type=int, default=256, help="data_memory section: their cached size")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for but this machine has no CUDA GPU; use --device cpu")
    unknown = sorted(set(args.models or []) - set(model_names()))
    if unknown:
        parser.error(f"unknown model config(s) {unknown}; choose from {model_names()}")
    for key, value in _defaults(device.type == "cuda").items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.workdir = args.workdir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "segx" / "bench"
    return args


def _lookup(results: dict[str, Any], key: str) -> float | None:
    if key == "unet_train_images_per_second":
        rows = [r for r in results.get("models", []) if r["model"] == "unet"]
        return rows[0]["train_images_per_second"] if rows else None
    value: Any = results
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value)


def check_targets(results: dict[str, Any], device_type: str) -> dict[str, dict[str, Any]]:
    """Each target of this device type with its measured figure and whether it was met (None: not measured)."""
    compare = {">=": float.__ge__, "<=": float.__le__, "<": float.__lt__}
    checked = {}
    for key, op, target in TARGETS[device_type]:
        value = _lookup(results, key)
        checked[key] = {"target": f"{op} {target:g}", "measured": value,
                        "met": None if value is None else bool(compare[op](value, target))}
    return checked


def cpu_name() -> str:
    """The processor's model name (platform.processor() is empty on many Linux machines)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _say(text: str) -> None:
    print(text, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every requested section; returns (and writes to `args.json`) the results."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    accelerator = "gpu" if cuda else "cpu"
    precision = precision_for("auto", accelerator)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({cpu_name()}, "
                                                                  f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "precision": precision, "memory_format": "channels_last",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"},
        "details": {},
    }
    details = results["details"]
    start = time.perf_counter()
    root = args.data_root
    if root is None and {"data", "loop", "predict"} & set(args.sections):
        _say(f"Generating shapes at VOC's image sizes ({args.images} train, {args.predict_images} val) in "
             f"{args.workdir} (reused when present)")
        root = voc_sized_tree(args.workdir / "voc-sized-shapes", args.images, args.predict_images)

    if "data" in args.sections:
        _say("data_speedup: one epoch through segx's data path vs torchvision's VOCSegmentation ...")
        data = data_speedup(root, args.size, args.data_batch, device)
        results["data_speedup"], details["data_speedup"] = data["ratio"], data
        _say(f"  segx {data['segx_images_per_second']:,.0f} images/s, torchvision "
             f"{data['torchvision_images_per_second']:,.0f} images/s ({data['torchvision_workers']} workers): "
             f"{data['ratio']:.1f}x  (cache built once in {data['cache_build_seconds']:.1f}s)")

    if "data_memory" in args.sections:
        from segx.bench.data_memory import data_memory

        _say(f"data_memory: 1, then 4 concurrent jobs reading one cache ({args.memory_images} shapes images at "
             f"{args.memory_size}px) ...")
        memory = data_memory(args.workdir, args.memory_images, args.memory_size)
        results["data_memory_ratio"], details["data_memory"] = memory["ratio"], memory
        _say(f"  cache {memory['cache_mb']:.0f} MB; one job {memory['one_job_mb']:.0f} MB, four jobs "
             f"{memory['four_jobs_mb']:.0f} MB together ({memory['ratio']:.2f}x; each job's own copies "
             f"{', '.join(f'{m:.0f}' for m in memory['private_mb_per_job'])} MB); loaded in "
             f"{memory['one_job_load_seconds']:.2f}s alone, {max(memory['load_seconds']):.2f}s at most of four")

    if "loop" in args.sections:
        _say("peak: a large matmul and a 512-channel 3x3 convolution ...")
        peak = device_peak(device)
        details["peak"] = peak
        _say(f"  matmul {peak['matmul_gflops']:.0f} GFLOP/s, conv3x3 {peak['conv3x3_gflops']:.0f} GFLOP/s "
             f"({peak['dtype']})")
        _say(f"lightning_overhead: {args.network} at {args.size}px, batch {args.batch}, {args.steps} steps after "
             f"{args.warmup} ...")
        cfg = run_config(args.network, root, args.size, args.batch, accelerator, precision, args.warmup + args.steps,
                         [f"data.cache_dir={args.workdir / 'cache'}"])
        loop = loop_comparison(cfg, device, args.warmup, args.steps, peak["peak_gflops"], args.predict_images)
        for key in ("lightning_overhead", "train_peak_fraction", "infer_peak_fraction"):
            figure = loop[key]
            results[key], details[key] = figure.get("ratio", figure.get("fraction")), figure
        overhead = loop["lightning_overhead"]
        _say(f"  segx step {overhead['lightning_step_seconds']:.3f}s, bare loop {overhead['bare_step_seconds']:.3f}s: "
             f"{overhead['ratio']:.3f}x; train {loop['train_peak_fraction']['achieved_gflops']:.0f} GFLOP/s = "
             f"{loop['train_peak_fraction']['fraction']:.0%} of peak; inference "
             f"{loop['infer_peak_fraction']['achieved_gflops']:.0f} GFLOP/s = "
             f"{loop['infer_peak_fraction']['fraction']:.0%}")

    if "predict" in args.sections:
        from segx.data import VOCDataModule

        datamodule = VOCDataModule(root=str(root), image_size=args.size, cache_dir=str(args.workdir / "cache"))
        images = datamodule.load_split("val").images[: args.predict_images]
        _say(f"predict_val_seconds: the study's protocol on {len(images)} val images, scaled to 1,449 ...")
        predict = predict_val_seconds(list(STUDY_UNETS), images, device, precision, batch_size=64)
        results["predict_val_seconds"], details["predict_val_seconds"] = predict["seconds"], predict
        for name, seconds in predict["seconds"].items():
            _say(f"  {name:<12} {seconds:8.2f}s for 1,449 images ({predict['timed_seconds'][name]:.3f}s for "
                 f"{len(images)})")

    if "memory_format" in args.sections:
        _say(f"memory format: {args.network} in NCHW vs channels_last ...")
        fmt = channels_last_speedup(args.network, args.batch, args.size, device, precision, args.repeats)
        details["channels_last"] = fmt
        _say(f"  channels_last forward {fmt['forward_speedup']:.2f}x, training step {fmt['train_step_speedup']:.2f}x")

    if "models" in args.sections:
        names = args.models or model_names()
        _say(f"models: batch {args.model_batch} at {args.size}px, {precision}, channels_last")
        _say(f"  {'model':<16}{'parameters':>13}{'GFLOPs/img':>12}{'train img/s':>13}{'predict img/s':>15}")
        rows = []
        for name in names:
            row = model_row(name, args.model_batch, args.size, device, precision, args.repeats)
            rows.append(row)
            _say(f"  {name:<16}{row['parameters']:>13,}{row['forward_gflops_per_image']:>12.2f}"
                 f"{row['train_images_per_second']:>13.1f}{row['predict_images_per_second']:>15.1f}")
        results["models"] = rows

    if "precision" in args.sections:
        from segx.bench.precision import bf16_agreement, train_reference

        _say("precision: a trained network's val labels on the CPU in bf16 against fp32 ...")
        ckpt = args.precision_ckpt or train_reference(args.workdir, args.precision_epochs, 64)
        agreement = bf16_agreement(ckpt)
        for key in ("bf16_label_agreement", "bf16_miou_difference", "bf16_predict_speedup"):
            results[key] = agreement[key]
        details["precision"] = agreement
        _say(f"  {agreement['bf16_label_agreement']:.2%} of {agreement['images']} images' pixels labelled alike, "
             f"mIoU {agreement['miou_32-true']:.4f} fp32 vs {agreement['miou_bf16-mixed']:.4f} bf16; bf16 "
             f"{agreement['bf16_predict_speedup']:.2f}x as fast (bf16 units: {agreement['cpu_bf16_units']})")

    if "search" in args.sections:
        from segx.bench.search import search_bench

        _say("search: the bench grid recorded with 3 seeds, schedulers replayed over trial orders, real searches ...")
        search = search_bench(args.workdir, epochs=12, size=32, orders=args.search_orders, say=_say)
        for key in ("search_epoch_fraction", "search_p_regret_le_noise"):
            results[key] = search[key]
        details["search"] = search
        seconds = search["seconds"]
        _say(f"  search bench: {seconds['total']:.0f}s (recording {seconds['record']:.0f}s, replay "
             f"{seconds['replay']:.0f}s)")

    results["targets"] = check_targets(results, device.type)
    results["seconds"] = time.perf_counter() - start
    _say("targets:")
    for key, target in results["targets"].items():
        measured = "not measured" if target["measured"] is None else f"{target['measured']:.3g}"
        verdict = {True: "met", False: "NOT met", None: "-"}[target["met"]]
        _say(f"  {key:<30} {target['target']:<10} {measured:<14} {verdict}")
    write_json_atomic(args.json, results)
    _say(f"Wrote {args.json} ({results['seconds']:.0f}s)")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run(parse_args(argv))


def console() -> None:
    """`segx-bench` and `python -m segx.bench` (a console command's return value would become its exit code)."""
    main()
