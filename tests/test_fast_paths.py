"""The fast paths on the CPU: device-resident batches, channels_last, compile, one inference path,
FLOPs. Each CUDA-only choice (bf16, cudnn autotuning, the free-memory check) is a function tested here."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from segx.core.errors import ConfigError, SegxError
from segx.data import ShapesDataModule
from segx.data.augment import BatchAugment
from segx.data.datamodule import keep_on_device
from segx.data.device_batches import DeviceBatches, EpochOrderSampler
from segx.data.normalize import Normalize
from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from segx.inference.predictor import Predictor, cpu_has_bf16_units, inference_precision
from segx.inference.timing import time_prediction
from segx.models import UNet, build_network, forward_flops, run_options
from segx.training.losses import CrossEntropyLoss
from segx.training.module import SegmentationModule
from segx.training.runtime import resolve_benchmark
from tests.conftest import QUIET, TINY_MODEL, TINY_SHAPES, read_json, run_in_process

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _split(n: int = 10, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 3, size, size).clone()
    images[:, 1] += 100  # channels differ, so a layout mix-up shows
    masks = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, size, size).clone()
    return images, masks


def _ids(batches: DeviceBatches) -> list[int]:
    seen = []
    for images, masks in batches:
        assert torch.equal(images[:, 0, 0, 0], masks[:, 0, 0])  # image and mask rows stay paired
        seen += masks[:, 0, 0].tolist()
    return seen


def test_device_batches_cover_the_split_once_in_order_without_shuffle() -> None:
    images, masks = _split(10)
    batches = DeviceBatches(images, masks, batch_size=4)
    assert len(batches) == 3 and _ids(batches) == list(range(10))
    first = next(iter(batches))[0]
    assert torch.equal(first, images[:4])


def test_device_batches_shuffle_per_epoch_reproducibly() -> None:
    images, masks = _split(20)
    epoch = [0]
    batches = DeviceBatches(images, masks, batch_size=6, shuffle=True, seed=3, epoch=lambda: epoch[0])
    first = _ids(batches)
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert _ids(batches) == first  # same (seed, epoch): same order, e.g. after a resume
    epoch[0] = 1
    assert _ids(batches) != first and sorted(_ids(batches)) == list(range(20))
    other_seed = DeviceBatches(images, masks, batch_size=6, shuffle=True, seed=4)
    assert _ids(other_seed) != first


def test_the_dataloader_path_draws_the_same_order() -> None:
    images, masks = _split(11)
    for rank in range(2):
        batches = DeviceBatches(images, masks, 3, shuffle=True, seed=7, rank=rank, world_size=2)
        sampler = EpochOrderSampler(11, True, 7, lambda: 0, rank, 2)
        assert list(sampler) == _ids(batches) and len(sampler) == batches.num_samples


def test_ddp_shards_are_disjoint_for_validation_and_even_for_training() -> None:
    images, masks = _split(11)
    val = [_ids(DeviceBatches(images, masks, 4, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(sum(val, [])) == list(range(11))  # every val image exactly once over the ranks
    train = [DeviceBatches(images, masks, 2, shuffle=True, seed=1, rank=r, world_size=3) for r in range(3)]
    shards = [_ids(b) for b in train]
    assert {len(s) for s in shards} == {4} and {len(b) for b in train} == {2}  # same batch count: no rank waits
    assert set(sum(shards, [])) == set(range(11))  # 12 slots: every image, one repeated as padding


def test_normalize_keeps_the_memory_format_and_never_writes_into_its_input() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert Normalize(MEAN, STD)(images).is_contiguous(memory_format=torch.channels_last)
    floats = torch.full((1, 3, 2, 2), 255.0)
    Normalize(MEAN, STD)(floats)
    assert (floats == 255).all()


def test_normalize_matches_the_formula() -> None:
    images = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    expected = (images.float() / 255 - mean) / std
    torch.testing.assert_close(Normalize(MEAN, STD)(images), expected)


def test_flipping_uint8_before_normalising_gives_the_batch_of_the_float_path() -> None:
    images = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    masks = torch.randint(0, 21, (8, 6, 6), dtype=torch.uint8)
    normalize = Normalize(MEAN, STD)
    old = BatchAugment(hflip=True, scale_min=0.8, scale_max=1.2, seed=5)(normalize(images), masks.long())
    augment = BatchAugment(hflip=True, scale_min=0.8, scale_max=1.2, seed=5)
    flipped, flipped_masks = augment.flip(images, masks)
    new = augment.rescale(normalize(flipped), flipped_masks.long())
    torch.testing.assert_close(new[0], old[0])
    assert torch.equal(new[1], old[1])


def test_on_device_choice() -> None:
    cpu = torch.device("cpu")
    assert keep_on_device("auto", 10**12, cpu, 0.5)  # on the CPU the split is already in memory
    assert keep_on_device(True, 1, cpu, 0.5) and not keep_on_device(False, 1, cpu, 0.5)
    with pytest.raises(SegxError, match="data.on_device='gpu' is not a choice"):
        keep_on_device("gpu", 1, cpu, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the free-memory check needs a CUDA device")
def test_on_device_auto_respects_free_cuda_memory() -> None:
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    assert keep_on_device("auto", 1000, device, 0.5) and not keep_on_device("auto", free, device, 0.5)


def test_the_datamodule_serves_device_batches_unless_told_not_to(shapes_root: Path) -> None:
    common = dict(root=str(shapes_root), num_train=96, num_val=16, min_size=48, max_size=80, image_size=32,
                  batch_size=8)
    resident = ShapesDataModule(**common)
    resident.setup("fit")
    assert isinstance(resident.train_dataloader(), DeviceBatches)
    loader = ShapesDataModule(**common, on_device=False)
    loader.setup("fit")
    assert isinstance(loader.train_dataloader(), DataLoader)
    for (a_images, a_masks), (b_images, b_masks) in zip(resident.val_dataloader(), loader.val_dataloader(),
                                                        strict=True):
        assert torch.equal(a_images, b_images) and torch.equal(a_masks, b_masks)
    with pytest.raises(SegxError, match="on_device_memory_fraction"):
        ShapesDataModule(**common, on_device_memory_fraction=0)


@pytest.mark.slow
def test_both_data_paths_train_identically(tmp_path: Path, shapes_root: Path) -> None:
    """Same seed: the resident path and the DataLoader path draw the same batches in the same order, so the
    choice is one of speed only."""
    scores = {}
    for on_device in ("true", "false"):
        run = tmp_path / on_device
        run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}",
                        f"data.on_device={on_device}", "trainer.max_epochs=3", "optimizer.lr=3e-3",
                        "run.channels_last=true", f"hydra.run.dir={run}")  # not auto: a timed choice could differ
        metrics = read_json(run / "metrics.json")
        assert metrics["epochs"] == 3 and metrics["forward_gflops_per_image"] > 0
        scores[on_device] = [{k: v for k, v in h.items() if "/" in k} for h in metrics["history"]]
        served = "data.on_device: the train split (96 images" in (run / "train.log").read_text()
        assert served == (on_device == "true")
    assert scores["true"] == scores["false"]
    assert scores["true"][-1]["val/miou"] > scores["true"][0]["val/miou"]


def test_forward_flops_counts_a_convolution_exactly() -> None:
    conv = torch.nn.Conv2d(3, 21, 3, padding=1, bias=False)
    assert forward_flops(conv, 16) == 2 * 3 * 21 * 9 * 16 * 16  # a multiply-add counts 2
    net = UNet(num_classes=21, encoder_widths=[8, 16], bottleneck_width=32)
    assert forward_flops(net, 64) == 4 * forward_flops(net, 32)  # convolutions scale with the pixels
    assert next(net.parameters()).device.type == "cpu"  # counted on a meta copy; the network is untouched


def test_run_options_are_not_constructor_arguments() -> None:
    cfg = {"_target_": "segx.models.UNet", "num_classes": 21, "encoder_widths": [8], "bottleneck_width": 8}
    run = {"channels_last": True, "compile": False}
    net = build_network(cfg, run_options({"model": cfg, "run": run}))
    weight = net.encoder[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not build_network(cfg).encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(SegxError, match="run.compile='yes' must be true, false or the name of a torch.compile "
                                        "backend: .*aot_eager.*inductor"):
        run_options({"model": cfg, "run": {**run, "compile": "yes"}})
    assert run_options({"model": cfg, "run": {**run, "compile": "aot_eager"}})["compile"] == "aot_eager"


def test_cudnn_autotuning_defaults_on_only_for_cuda() -> None:
    assert resolve_benchmark(None, cuda=True, deterministic=False)
    assert not resolve_benchmark(None, cuda=False, deterministic=False)
    assert not resolve_benchmark(None, cuda=True, deterministic=True)
    assert resolve_benchmark(True, cuda=False, deterministic=False) and not resolve_benchmark(False, True, False)


def test_inference_precision_is_bf16_on_cpus_with_bf16_units_and_follows_the_run_on_cuda() -> None:
    cpu = torch.device("cpu")
    units = cpu_has_bf16_units()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if flags:  # what torch reports is what the processor lists
        assert units == any(f" {flag}" in flags for flag in ("amx_tile", "avx512_bf16"))
    for run_precision in ("32-true", "bf16-mixed", "16-mixed"):  # a run's training precision does not decide it
        assert inference_precision(run_precision, cpu) == ("bf16-mixed" if units else "32-true")
    assert inference_precision("bf16-mixed", cpu, "32-true") == "32-true"
    assert inference_precision("32-true", cpu, "bf16-mixed") == "bf16-mixed"
    with pytest.raises(ConfigError, match="inference.precision=16-mixed is for CUDA GPUs"):
        inference_precision("32-true", cpu, "16-mixed")
    with pytest.raises(ConfigError, match="inference.precision='fp8' is not a choice"):
        inference_precision("32-true", cpu, "fp8")
    if torch.cuda.is_available():
        assert inference_precision("16-true", torch.device("cuda")) == "16-mixed"


def test_one_inference_path_in_every_precision_and_format() -> None:
    torch.manual_seed(0)
    net = UNet(num_classes=21, encoder_widths=[8, 16], bottleneck_width=16).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        reference = net(Normalize(MEAN, STD)(images))
    plain = Predictor(net, "cpu", channels_last=False, batch_size=2)
    nhwc = Predictor(UNet(num_classes=21, encoder_widths=[8, 16], bottleneck_width=16), "cpu", batch_size=4)
    nhwc.net.load_state_dict(net.state_dict())
    for predictor in (plain, nhwc):
        logits = torch.cat([logits for _, logits in predictor.batches(images)])
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    assert nhwc.net.encoder[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    # bf16 autocast: the path a GPU run takes, run here on the CPU
    bf16 = Predictor(net, "cpu", precision="bf16-mixed", batch_size=5)
    logits = bf16.logits(images)
    assert logits.dtype == torch.bfloat16
    agree = (logits.float().argmax(1) == reference.argmax(1)).float().mean()
    assert agree > 0.9
    timing = time_prediction(bf16, images, passes=2, warmup=1)
    assert timing["predict_images"] == 5 and len(timing["predict_pass_seconds"]) == 2


@pytest.mark.slow
def test_a_compiled_network_trains_and_checkpoints_under_its_own_names(tmp_path: Path, shapes_root: Path) -> None:
    data = ShapesDataModule(root=str(shapes_root), num_train=96, num_val=16, min_size=48, max_size=80,
                            image_size=32, batch_size=8)
    cfg = {"_target_": "segx.models.UNet", "num_classes": 21, "encoder_widths": [8], "bottleneck_width": 8}
    # Dynamo's wrapper (which renames parameters `_orig_mod.*`) is the same for every backend; aot_eager traces the
    # forward and backward as inductor does but compiles no C++ (inductor's kernels cost half a minute here).
    run = {"channels_last": True, "compile": "aot_eager", "flush_denormal": True}
    torch.manual_seed(0)
    optimizer = {"_target_": "torch.optim.Adam", "lr": 1e-3}
    module = SegmentationModule(build_network(cfg, run), CrossEntropyLoss(), optimizer,
                                run_config={"model": cfg, "run": run}, channels_last=True)
    # No validation: each graph (train, eval) costs seconds of C++ compile, and the eval one is compiled below.
    trainer = pl.Trainer(max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = load_checkpoint(path)
    assert not any("_orig_mod" in key for key in checkpoint["state_dict"])
    restored = network_from_checkpoint(checkpoint).eval()  # a plain network: compile is how it ran, not what it is
    images = data.load_split("val").images[:8]  # the training batch's size: no recompile for another shape
    with torch.no_grad():
        expected = module.net.eval()(data.normalize(images).contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(restored(data.normalize(images)), expected, atol=1e-4, rtol=1e-4)
