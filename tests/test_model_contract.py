"""One contract for every file in conf/model/: new model configs are covered without new tests.

Each config must instantiate through Hydra, map [N,3,H,W] to logits [N,21,H,W] for several sizes,
learn on a fixed batch, and survive checkpoint save → evaluate-style load with identical logits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from segx.core.errors import ConfigError
from segx.data import ShapesDataModule
from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from segx.models import build_network, parameter_counts
from segx.models.contract import SegmentationNetwork, check_input_size, pads_input, size_divisor
from segx.training.losses import CrossEntropyLoss
from segx.training.module import SegmentationModule
from tests.conftest import ROOT

MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))

SEED_COUNTS = {  # (total, trainable) from the study's Keras model summaries
    "unet": (31_048_917, 31_040_981),
    "unet_medium": (7_706_325, 7_702_485),
    "unet_small": (4_065_749, 4_062_933),
    "fcn": (34_397_525, 34_397_525),
    "fcn_study": (34_397_525, 34_397_525),
    "resunet_study": (401_564_629, 401_505_877),
    "pspnet_study": (3_365_781, 3_358_741),
}

# Narrow versions for the tests that train, keyed by the network class; an unknown class trains full size.
NARROW = {
    "segx.models.UNet": ["model.encoder_widths=[8,16]", "model.bottleneck_width=16"],
    "segx.models.fcn.FCN": ["model.widths=[8,8,16,16]", "model.fc_width=32"],
    "segx.models.resunet.ResUNet": ["model.widths=[8,16,32]"],
    "segx.models.pspnet.PSPNet": ["model.widths=[8,16,32,32]", "model.head_channels=16"],
    "segx.models.smp.SMPModel": ["model.encoder=resnet18"],
    "segx.models.resunet_study.StudyResUNet": ["model.widths=[4,8,8,16,16,32]"],
    "segx.models.pspnet_study.StudyPSPNet": ["model.widths=[8,8,16,16,16]", "model.pyramid_channels=16"],
}

# Built full size on the meta device only (shapes, no values): the study's ResU-Net has 401.6M parameters, 1.6 GB.
META_AT_FULL_SIZE = {"segx.models.resunet_study.StudyResUNet"}


def model_config(name: str, narrow: bool = False) -> DictConfig:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}"])
        if narrow:
            cfg = compose("train", overrides=[f"model={name}", *NARROW.get(cfg.model._target_, [])])
    return cfg.model


def test_the_model_zoo_is_not_empty() -> None:
    assert {"unet", "unet_medium", "unet_small", "fcn", "resunet", "pspnet", "smp", "deeplabv3plus"} <= set(
        MODEL_CONFIGS)


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_full_size_model_returns_logits_for_every_input_size(name: str) -> None:
    cfg = model_config(name)
    device = "meta" if cfg._target_ in META_AT_FULL_SIZE else "cpu"
    with torch.device(device):
        net = build_network(cfg).eval()
    divisor = 1 if pads_input(net) else size_divisor(net)
    with torch.no_grad():
        for size in (s for s in (64, 96, 128) if s % divisor == 0):  # 96 is no multiple of 32
            out = net(torch.randn(1, 3, size, size, device=device))
            assert out.shape == (1, 21, size, size), (name, size)
            if device != "meta":  # meta tensors hold no values
                assert torch.isfinite(out).all()
    if name in SEED_COUNTS:
        counts = parameter_counts(net)
        assert (counts["total"], counts["trainable"]) == SEED_COUNTS[name]


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_a_few_training_steps_reduce_the_loss_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(model_config(name, narrow=True)).train()
    x = torch.randn(2, 3, 64, 64)
    y = torch.zeros(2, 64, 64, dtype=torch.long)
    y[:, 16:48, 16:48] = 7
    y[:, :2] = 255
    loss_fn = CrossEntropyLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_checkpoint_round_trip_gives_identical_logits(name: str, shapes_root: Path, tmp_path: Path) -> None:
    model_cfg = model_config(name, narrow=True)
    data = ShapesDataModule(root=str(shapes_root), num_train=96, num_val=16, min_size=48, max_size=80,
                            image_size=64, batch_size=2)
    module = SegmentationModule(
        build_network(model_cfg), CrossEntropyLoss(),
        optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        run_config={"model": OmegaConf.to_container(model_cfg, resolve=True)},
    )
    trainer = pl.Trainer(max_steps=1, limit_val_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=data)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = network_from_checkpoint(load_checkpoint(path)).eval()
    x = data.normalize(data.load_split("val").images[:2])
    with torch.no_grad():
        assert torch.equal(module.net.eval()(x), restored(x))


# -- the size contract (segx.models.contract) ----------------------------------------------------------------
@pytest.mark.parametrize("name", MODEL_CONFIGS)
def test_every_network_declares_the_input_sizes_it_takes(name: str) -> None:
    """`size_divisor` and `pads_input` say what forward() and the build-time check accept, for every config."""
    net = build_network(model_config(name, narrow=True)).eval()
    assert isinstance(net, SegmentationNetwork)
    divisor, pads = size_divisor(net), pads_input(net)
    odd = 2 * divisor + 1  # a multiple of no divisor above 1
    if pads or divisor == 1:
        sizes = [odd, max(1, divisor // 4)] if pads else [odd]  # and where the pad reaches the input's size
        with torch.no_grad():
            for size in sizes:
                assert net(torch.randn(1, 3, size, size)).shape == (1, 21, size, size), (name, size)
        assert check_input_size(net, odd, name) > 0
        return
    with pytest.raises(ConfigError, match=f"needs height and width divisible by {divisor}, got \\({odd}, {odd}\\)"):
        net(torch.randn(1, 3, odd, odd))
    build_time = f"data.image_size={odd} cannot be used with {name}: .*divisible by {divisor}"
    with pytest.raises(ConfigError, match=build_time):
        check_input_size(net, odd, name)
    assert check_input_size(net, 2 * divisor, name) > 0


def test_the_contract_is_read_through_a_compiled_module_and_checked() -> None:
    net = build_network(model_config("unet_small", narrow=True))
    compiled = torch.compile(net)  # wraps only: nothing is compiled before the first call
    assert (size_divisor(compiled), pads_input(compiled)) == (size_divisor(net), False) == (4, False)
    assert (size_divisor(torch.nn.Conv2d(3, 21, 1)), pads_input(torch.nn.Conv2d(3, 21, 1))) == (1, False)
    net.size_divisor = 0
    with pytest.raises(TypeError, match="size_divisor must be a positive int"):
        size_divisor(net)
