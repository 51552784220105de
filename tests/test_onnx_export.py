"""ONNX export of networks that pad their input (smp): the padding, its reflect→replicate fallback and the metadata.

A tiny timm encoder (`tu-test_resnet`, no pretrained weights) keeps each export to a few seconds.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from segx.inference.checkpoint import load_checkpoint, network_from_checkpoint, run_config
from segx.inference.export import export_network, export_onnx, verify_onnx
from segx.models.contract import pads_input, size_divisor
from segx.models.smp import SMPModel

ENCODER = "tu-test_resnet"
DIVISOR = 32  # its output stride

# (batch, height, width): where reflect padding must fall back to replicate (a pad at least the input's side, on
# either side or both), and where it need not (regular padding, none at all).
FALLBACK_SHAPES = [(1, 8, 8), (2, 5, 70), (1, 40, 3), (1, 1, 1)]
REGULAR_SHAPES = [(1, 31, 40), (1, 64, 64)]


def _small_smp(pad_mode: str = "reflect", arch: str = "unet") -> SMPModel:
    torch.manual_seed(0)
    decoder = {"decoder_channels": [16, 8, 8, 8, 8]} if arch == "unet" else {}
    return SMPModel(arch, ENCODER, encoder_weights=None, num_classes=3, pad_mode=pad_mode, **decoder).eval()


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_the_fallback_shapes_reach_a_pad_as_wide_as_the_input() -> None:
    for _, height, width in FALLBACK_SHAPES:
        assert -height % DIVISOR >= height or -width % DIVISOR >= width
    for _, height, width in REGULAR_SHAPES:
        assert -height % DIVISOR < height and -width % DIVISOR < width


@pytest.mark.parametrize("pad_mode", ["reflect", pytest.param("replicate", marks=pytest.mark.slow)])
def test_smp_export_matches_pytorch_where_the_padding_reaches_the_input_size(pad_mode: str, tmp_path: Path) -> None:
    net = _small_smp(pad_mode)
    assert size_divisor(net) == DIVISOR and pads_input(net)
    report = export_network(net, tmp_path / "model.onnx", example_size=32)
    differences = verify_onnx(report.path, net, FALLBACK_SHAPES + REGULAR_SHAPES)
    assert [shape[2:] for shape, _ in differences] == [s[1:] for s in FALLBACK_SHAPES + REGULAR_SHAPES]
    assert max(d for _, d in differences) < 1e-4, differences
    # The export checks a fallback shape itself, besides the two regular ones.
    checked = [shape for shape, _ in report.differences]
    assert len(checked) == 3 and -checked[2][2] % DIVISOR >= checked[2][2], checked


@pytest.mark.slow
def test_smp_pspnet_export_matches_pytorch_at_the_fallback_shapes(tmp_path: Path) -> None:
    """PSPNet (its pyramid pooling replaced for export) at stride 8: the fallback at a smaller divisor."""
    net = _small_smp(arch="pspnet")
    assert size_divisor(net) == 8
    report = export_network(net, tmp_path / "psp.onnx", example_size=32)
    differences = verify_onnx(report.path, net, [(1, 2, 2), (1, 3, 20), (2, 17, 9)])
    assert max(d for _, d in differences) < 1e-4, differences


def _legacy_smp_checkpoint(path: Path) -> SMPModel:
    """A checkpoint as train.py wrote it before the wrapper moved to segx.models.smp (its config's old target)."""
    net = _small_smp()
    model = {"_target_": "segx.models.smp_model.SMPModel", "arch": "unet", "encoder": ENCODER,
             "encoder_weights": None, "num_classes": 3, "in_channels": 3, "pad_mode": "reflect",
             "decoder_channels": [16, 8, 8, 8, 8], "channels_last": True, "compile": False}
    data = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "image_size": 32, "num_classes": 3,
            "class_names": ["background", "square", "circle"]}
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    torch.save({"state_dict": state, "segx": {"format": 1, "config": {"model": model, "data": data},
                                              "class_names": data["class_names"]}}, path)
    return net


def test_a_checkpoint_naming_the_old_smp_module_loads_and_exports(tmp_path: Path) -> None:
    original = _legacy_smp_checkpoint(tmp_path / "old.ckpt")
    checkpoint = load_checkpoint(tmp_path / "old.ckpt")
    assert run_config(checkpoint).model._target_ == "segx.models.smp.SMPModel"
    restored = network_from_checkpoint(checkpoint).eval()
    assert isinstance(restored, SMPModel)
    x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(x), restored(x))



def test_the_export_of_a_checkpoint_records_the_networks_divisor_and_that_it_pads(tmp_path: Path) -> None:
    _legacy_smp_checkpoint(tmp_path / "old.ckpt")
    report = export_onnx(tmp_path / "old.ckpt", tmp_path / "old.onnx")
    assert (report.size_divisor, report.pads_input, report.input_multiple) == (DIVISOR, True, 1)
    assert report.max_abs_difference < 1e-4
    metadata = _metadata(report.path)
    assert metadata["size_divisor"] == str(DIVISOR) and metadata["pads_input"] == "true"
    assert "any H and W" in metadata["segx.input"] and metadata["image_size"] == "32"
