"""`instantiate(cfg.model)` returns the network for every file of conf/model/; how segx runs it (memory format,
compile, denormals) lives in the `run` node, whose `channels_last` (auto, probe) is decided per device; checkpoints
written when those options were `model` keys still load and predict."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from segx.core.errors import ConfigError
from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from segx.inference.predictor import Predictor, inference_memory_format
from segx.models import LEGACY_MODEL_KEYS, RUN_OPTIONS, UNet, build_network, run_options
from segx.models.memory_format import PROBE_MARGIN, choose_memory_format, probe_channels_last
from segx.runs.job import JobInfo
from segx.training.runtime import Runtime, choose_run_memory_format, processes_per_run
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, read_json

MODEL_FILES = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))
# Instantiated on the meta device (shapes, no values): the study's ResU-Net has 401.6M parameters, 1.6 GB.
META_AT_FULL_SIZE = {"segx.models.resunet_study.StudyResUNet"}


def _compose(*overrides: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", list(overrides))


@pytest.mark.parametrize("name", MODEL_FILES)
def test_instantiate_cfg_model_returns_the_network(name: str) -> None:
    """Exactly what a user's script does; every default config trains from scratch (`encoder_weights: null`),
    so nothing needs an override to stay offline."""
    cfg = _compose(f"model={name}")
    assert not set(cfg.model) & set(LEGACY_MODEL_KEYS), "run options belong in conf/train.yaml's run node"
    torch.manual_seed(0)
    device = "meta" if cfg.model._target_ in META_AT_FULL_SIZE else "cpu"
    with torch.device(device):
        net = instantiate(cfg.model)
    assert isinstance(net, torch.nn.Module)
    with torch.no_grad():
        logits = net.eval()(torch.randn(1, 3, 64, 64, device=device))
    assert logits.shape == (1, 21, 64, 64) and logits.dtype == torch.float32


def test_the_run_node_holds_the_run_options_each_commented() -> None:
    cfg = _compose()
    assert OmegaConf.to_container(cfg.run) == RUN_OPTIONS == {"channels_last": "auto", "compile": False,
                                                              "flush_denormal": True}
    assert "flush_denormal" not in cfg
    lines = (ROOT / "conf" / "train.yaml").read_text().splitlines()
    block = lines[lines.index(next(line for line in lines if line.startswith("run:"))) + 1:]
    keys = [line for line in block[:next(i for i, line in enumerate(block) if not line.startswith(" "))]
            if not line.strip().startswith("#")]
    assert sorted(line.split(":")[0].strip() for line in keys) == sorted(RUN_OPTIONS)
    assert all("#" in line for line in keys), keys


def test_run_options_read_the_run_node_and_the_keys_older_configs_had() -> None:
    assert run_options(_compose("run.channels_last=false", "run.compile=true")) == {
        "channels_last": False, "compile": True, "flush_denormal": True}
    legacy = {"model": {"_target_": "segx.models.UNet", "channels_last": True, "compile": False},
              "flush_denormal": False}
    assert run_options(legacy) == {"channels_last": True, "compile": False, "flush_denormal": False}
    assert run_options({})["channels_last"] == "auto"
    with pytest.raises(ConfigError, match=r"run.channels_last='yes' must be auto, probe, true or false"):
        run_options({"run": {"channels_last": "yes"}})
    with pytest.raises(ConfigError, match=r"run.compile='yes' must be true, false or the name of a torch.compile"):
        run_options({"run": {"compile": "yes"}})


def test_auto_is_channels_last_on_cuda_without_a_probe() -> None:
    calls: list[int] = []
    choice = choose_memory_format("auto", torch.device("cuda", 0), probe=lambda: calls.append(1) or 0.5)
    assert choice.channels_last and choice.describe() == "channels_last (auto: CUDA)" and calls == []


def test_auto_on_a_cpu_is_contiguous_without_timing_anything() -> None:
    calls: list[int] = []
    choice = choose_memory_format("auto", "cpu", probe=lambda: calls.append(1) or 2.0)
    assert not choice.channels_last and calls == []
    assert choice.describe() == "contiguous (auto: CPU, repeatable; run.channels_last=probe times both formats)"


def test_probe_on_a_cpu_follows_the_probe() -> None:
    slower = choose_memory_format("probe", "cpu", probe=lambda: 0.91)
    assert not slower.channels_last and slower.describe() == "contiguous (probe: on this CPU 0.91x)"
    assert slower.torch_format == torch.contiguous_format and slower.speedup == pytest.approx(0.91)
    faster = choose_memory_format("probe", "cpu", probe=lambda: 1.3)
    assert faster.channels_last and faster.describe() == "channels_last (probe: on this CPU 1.30x)"
    assert choose_memory_format("probe", torch.device("cuda", 0), probe=lambda: 0.5).describe() == \
        "channels_last (probe: CUDA)"
    tie = choose_memory_format("probe", "cpu", probe=lambda: PROBE_MARGIN - 0.01)  # NCHW, the default, on a tie
    assert not tie.channels_last


def test_probe_is_contiguous_when_the_probe_cannot_run() -> None:
    def failing() -> float:
        raise RuntimeError("no NHWC kernel for this operation\nsecond line")

    failed = choose_memory_format("probe", "cpu", probe=failing)
    assert not failed.channels_last
    assert failed.describe() == "contiguous (probe: the probe on this CPU failed (no NHWC kernel for this operation))"
    assert choose_memory_format("probe", "cpu").describe() == "contiguous (probe: no probe)"
    assert not choose_memory_format("auto", "mps").channels_last


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_an_explicit_setting_wins_over_device_and_probe(device: str) -> None:
    calls: list[int] = []

    def probe() -> float:
        calls.append(1)
        return 2.0

    off = choose_memory_format(False, device, probe)
    on = choose_memory_format("true", device, lambda: 0.1)  # a command line's string
    assert (off.channels_last, off.describe()) == (False, "contiguous (run.channels_last=false)")
    assert (on.channels_last, on.describe()) == (True, "channels_last (run.channels_last=true)")
    assert calls == []


def test_the_probe_times_the_network_and_leaves_it_and_the_generators_alone() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(UNet(num_classes=21, encoder_widths=[8, 16], bottleneck_width=16),
                              torch.nn.Dropout2d(0.5)).train()  # dropout draws from the global generator
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    speedup = probe_channels_last(net, batch_size=4, image_size=32, budget_s=0.2, rounds=2)
    assert speedup > 0
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random draws are those of a run without a probe
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert next(net.parameters()).is_contiguous() and net.training
    assert probe_channels_last(net.eval(), batch_size=2, image_size=32, training=False, budget_s=0.1) > 0


def test_a_run_times_only_where_one_timing_holds_for_the_whole_run() -> None:
    net = UNet(num_classes=21, encoder_widths=[8], bottleneck_width=8)
    cpu = Runtime(accelerator="cpu", devices="cpu", precision="32-true", strategy="auto", sync_batchnorm=False)
    cuda = Runtime(accelerator="cuda", devices="0", precision="bf16-mixed", strategy="auto", sync_batchnorm=False)
    deterministic = choose_run_memory_format("probe", net, cpu, {"deterministic": True}, 2, 32)
    assert deterministic.describe() == "contiguous (probe: trainer.deterministic, no timing probe)"
    two = choose_run_memory_format("probe", net, cpu, {"devices": 2}, 2, 32)
    assert two.describe() == "contiguous (probe: 2 processes, no timing probe)"
    assert choose_run_memory_format("probe", net, cuda, {"devices": 2}, 2, 32).channels_last
    assert choose_run_memory_format("auto", net, cpu, {"devices": "auto"}, 2, 32).speedup is None
    timed = choose_run_memory_format("probe", net, cpu, {"devices": "auto"}, 2, 32)
    assert timed.speedup is not None and "probe: on this CPU" in timed.reason
    assert timed.channels_last == (timed.speedup >= PROBE_MARGIN)
    assert [processes_per_run(t) for t in ({}, {"devices": "3"}, {"devices": [0, 1]}, {"devices": 2, "num_nodes": 2},
                                           {"devices": "0,1"})] == [1, 3, 2, 4, 2]


def _train_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> Path:
    from segx.training import train as training

    monkeypatch.setattr(training, "_route_lightning_logs", lambda: None)  # leave the test's logging alone
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them; undone afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    cfg = _compose(*TINY_MODEL, *TINY_SHAPES, *QUIET, "trainer.accelerator=cpu", "trainer.max_epochs=1",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "logger=none",
                   "callbacks.prediction_grid=null", "run.flush_denormal=false", *overrides)
    run_dir = tmp_path / "run"
    training.train(cfg, JobInfo(run_dir=run_dir))
    return run_dir


def test_the_model_log_line_and_metrics_json_name_the_chosen_format(
    tmp_path: Path, shapes_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="segx.training.train")
    run_dir = _train_in_process(tmp_path, monkeypatch, f"data.root={shapes_root}", "run.channels_last=probe")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Model ")]
    recorded = read_json(run_dir / "metrics.json")["memory_format"]
    assert "(probe: on this CPU " in line and line.endswith(recorded)
    assert recorded.startswith(("channels_last (probe: on this CPU ", "contiguous (probe: on this CPU "))


def test_run_options_given_as_model_keys_are_refused_with_their_new_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ConfigError, match=r"model.channels_last is not an argument .* run.channels_last=false"):
        _train_in_process(tmp_path, monkeypatch, "data.root=unused", "+model.channels_last=false")


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_checkpoint_with_the_old_model_keys_loads_and_predicts(channels_last: bool, tmp_path: Path) -> None:
    """Written before the `run` node: `model.channels_last`/`model.compile` beside the constructor arguments."""
    model = {"_target_": "segx.models.UNet", "num_classes": 21, "in_channels": 3, "encoder_widths": [8, 16],
             "bottleneck_width": 16, "channels_last": channels_last, "compile": False}
    config = {"model": model, "data": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
              "trainer": {"precision": "32-true"}, "flush_denormal": True}
    torch.manual_seed(0)
    trained = build_network({k: v for k, v in model.items() if k not in LEGACY_MODEL_KEYS}).eval()
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in trained.state_dict().items()},
                "segx": {"format": 1, "config": config, "class_names": [str(i) for i in range(21)]}}, path)

    checkpoint = load_checkpoint(path)
    net = network_from_checkpoint(checkpoint)
    stored = OmegaConf.create(checkpoint["segx"]["config"])
    assert inference_memory_format(stored, net, "cpu", 4).channels_last is channels_last
    predictor = Predictor.from_run(net, stored, torch.device("cpu"), batch_size=4, precision="32-true")
    assert predictor.memory_format == (torch.channels_last if channels_last else torch.contiguous_format)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = trained((images.float() / 255 - 0.5) / 0.25)
    torch.testing.assert_close(predictor.logits(images), expected, atol=1e-4, rtol=1e-4)
    assert [labels.shape for _, labels in predictor.labels(images)] == [(3, 32, 32)]


def test_a_new_checkpoints_auto_is_decided_for_the_predicting_device() -> None:
    net = UNet(num_classes=21, encoder_widths=[8], bottleneck_width=8)
    config = OmegaConf.create({"run": {"channels_last": "auto"}, "data": {"image_size": 32}})
    if torch.cuda.is_available():
        assert inference_memory_format(config, net, torch.device("cuda"), 2).describe() == "channels_last (auto: CUDA)"
    assert not inference_memory_format(config, net, "cpu", 2).channels_last
    config.run.channels_last = "probe"
    cpu = inference_memory_format(config, net, "cpu", 2)
    assert cpu.speedup is not None and cpu.channels_last == (cpu.speedup >= PROBE_MARGIN)
    assert inference_memory_format(OmegaConf.create({"run": {"channels_last": False}}), net, "cpu", 2).reason == \
        "run.channels_last=false"
