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

from segx.data import ShapesDataModule
from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint
from segx.models import build_network, parameter_counts
from segx.training.losses import CrossEntropyLoss
from segx.training.module import SegmentationModule
from tests.conftest import ROOT

MODEL_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))

SEED_COUNTS = {  # (total, trainable) from the study's Keras model summaries
    "unet": (31_048_917, 31_040_981),
    "unet_medium": (7_706_325, 7_702_485),
    "unet_small": (4_065_749, 4_062_933),
    "fcn": (34_397_525, 34_397_525),
}

# Narrow versions for the tests that train, keyed by the network class; an unknown class trains full size.
NARROW = {
    "segx.models.UNet": ["model.encoder_widths=[8,16]", "model.bottleneck_width=16"],
    "segx.models.fcn.FCN": ["model.widths=[8,8,16,16]", "model.fc_width=32"],
    "segx.models.resunet.ResUNet": ["model.widths=[8,16,32]"],
    "segx.models.pspnet.PSPNet": ["model.widths=[8,16,32,32]", "model.head_channels=16"],
    "segx.models.smp_model.SMPModel": ["model.encoder=resnet18"],
}


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
    net = build_network(model_config(name)).eval()
    with torch.no_grad():
        for size in (64, 96, 128):
            out = net(torch.randn(1, 3, size, size))
            assert out.shape == (1, 21, size, size), (name, size)
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
        build_network(model_cfg, apply_options=False), CrossEntropyLoss(),
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
