"""FCN, ResUNet, PSPNet and the smp wrapper: the study's exact FCN, shapes, gradients, padding, configs, offline errors.

Everything runs on the CPU with narrow widths or small encoders; the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from segx.models.fcn import FCN
from segx.models.pspnet import PSPNet
from segx.models.resunet import ResUNet
from segx.models.smp_model import ARCHITECTURES, ModelWeightsUnavailableError, SMPModel

MODEL_CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NARROW = [8, 16, 32, 64]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _keras_count(model: nn.Module) -> int:
    """Parameters plus BatchNorm running mean/variance, the way Keras (and the config headers) count."""
    running = sum(
        m.running_mean.numel() + m.running_var.numel()
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
    )
    return _params(model) + running


def _assert_trains(model: nn.Module, size: int, batch: int = 2) -> None:
    """Train-mode forward at `size`, logits of the right shape, and a finite gradient for every parameter."""
    model.train()
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 21, size, size)
    F.cross_entropy(logits, torch.randint(0, 21, (batch, size, size))).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


# ---------------------------------------------------------------------------------------------- FCN


def test_fcn_has_exactly_the_study_parameter_count() -> None:
    model = FCN()
    assert _params(model) == 34_397_525
    assert model.fc1[0].weight.shape == (1024, 512, 7, 7)
    assert model.fc1[0].padding == (3, 3)  # Keras 'same' for 7×7
    assert model.classifier.weight.shape == (21, 1024, 1, 1)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fcn_returns_unnormalised_logits_at_input_size() -> None:
    model = FCN().eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 128, 128))
    assert logits.shape == (1, 21, 128, 128)
    # Logits, not probabilities: negative values exist and classes do not sum to one.
    assert (logits < 0).any()
    assert not torch.allclose(logits.sum(dim=1), torch.ones(1, 128, 128))


def test_fcn_upsample_modes_differ_and_nearest_is_blocky() -> None:
    bilinear = FCN(widths=NARROW, fc_width=32, upsample_mode="bilinear").eval()
    nearest = FCN(widths=NARROW, fc_width=32, upsample_mode="nearest").eval()
    nearest.load_state_dict(bilinear.state_dict())  # same weights: only the upsampling differs
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        smooth, blocky = bilinear(x), nearest(x)
    assert smooth.shape == blocky.shape == (1, 21, 64, 64)
    assert not torch.allclose(smooth, blocky)
    # Nearest ×16: every 16×16 tile repeats one coarse logit; bilinear varies inside a tile.
    tile = blocky[..., :16, :16]
    assert torch.equal(tile, tile[..., :1, :1].expand_as(tile))
    assert not torch.allclose(smooth[..., :16, :16], smooth[..., :1, :1].expand(-1, -1, 16, 16))


def test_fcn_rejects_unknown_upsample_mode_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="upsample_mode.*'bicubic'"):
        FCN(upsample_mode="bicubic")
    with pytest.raises(ValueError, match="convs_per_block"):
        FCN(widths=[8, 16], convs_per_block=[2, 2, 3])
    with pytest.raises(ValueError, match="divisible by 16"):
        FCN(widths=NARROW, fc_width=16)(torch.randn(1, 3, 72, 72))


def test_fcn_trains_with_narrow_widths() -> None:
    _assert_trains(FCN(widths=NARROW, fc_width=32), 64)


# ------------------------------------------------------------------------------------ ResUNet, PSPNet

FROM_SCRATCH = [
    pytest.param(ResUNet, {"widths": NARROW}, id="resunet"),
    pytest.param(PSPNet, {"widths": NARROW}, id="pspnet-os8"),
    pytest.param(PSPNet, {"widths": NARROW, "output_stride": 16}, id="pspnet-os16"),
]


@pytest.mark.parametrize(("cls", "kwargs"), FROM_SCRATCH)
@pytest.mark.parametrize("size", [64, 96])
def test_from_scratch_models_train_with_batch_two(cls: type[nn.Module], kwargs: dict, size: int) -> None:
    _assert_trains(cls(**kwargs), size)


@pytest.mark.parametrize(("cls", "kwargs"), FROM_SCRATCH)
@pytest.mark.parametrize("size", [64, 96])
def test_from_scratch_models_predict_with_batch_one(cls: type[nn.Module], kwargs: dict, size: int) -> None:
    model = cls(**kwargs).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert first.shape == (1, 21, size, size)
    assert torch.equal(first, second)  # eval mode: running BN statistics, no dropout
    assert (first < 0).any()  # logits, no ReLU or softmax on the output


def test_pspnet_trains_with_batch_one() -> None:
    # The 1×1 pyramid bin would hand BatchNorm a single value per channel here; PyTorch refuses that.
    _assert_trains(PSPNet(widths=NARROW), 64, batch=1)


def test_pspnet_output_stride_sets_the_pyramid_map_size() -> None:
    seen: dict[int, tuple[int, ...]] = {}
    for stride in (8, 16):
        model = PSPNet(widths=NARROW, output_stride=stride).eval()
        assert model.output_stride == stride
        model.ppm.register_forward_hook(lambda _m, inputs, _o, s=stride: seen.__setitem__(s, inputs[0].shape))
        with torch.no_grad():
            assert model(torch.randn(1, 3, 128, 128)).shape == (1, 21, 128, 128)
    assert seen[8][-2:] == (16, 16)
    assert seen[16][-2:] == (8, 8)
    with pytest.raises(ValueError, match="output_stride"):
        PSPNet(output_stride=32)


def test_resunet_uses_preactivation_blocks_and_rejects_bad_sizes() -> None:
    model = ResUNet(widths=NARROW)
    second = model.encoder[1]
    assert isinstance(second.pre[0], nn.BatchNorm2d)  # BN → ReLU before the first conv
    assert isinstance(second.shortcut, nn.Conv2d)  # 8 → 16 channels: projected shortcut
    with pytest.raises(ValueError, match="divisible by 8"):
        model(torch.randn(1, 3, 60, 60))


def test_resunet_default_size_is_in_unet_medium_range() -> None:
    assert _params(ResUNet()) == 8_045_717


# ------------------------------------------------------------------------------------------ SMP


@pytest.mark.parametrize("arch", ["unet", "fpn", "deeplabv3plus", "pspnet", "segformer", "pan"])
def test_smp_archs_accept_any_input_size(arch: str) -> None:
    model = SMPModel(arch, "resnet18").eval()
    with torch.no_grad():
        for size in (64, 96, 100):  # 100 is a multiple of none of the archs' strides
            assert model(torch.randn(2, 3, size, size)).shape == (2, 21, size, size)
        assert model(torch.randn(1, 3, 72, 136)).shape == (1, 21, 72, 136)


def test_smp_padding_keeps_the_pixel_grid_and_trains() -> None:
    model = SMPModel("fpn", "resnet18").eval()
    assert model.size_divisor == 32
    x = torch.randn(1, 3, 100, 100)
    with torch.no_grad():
        wrapped = model(x)
        direct = model.model(F.pad(x, (0, 28, 0, 28), mode="reflect"))
    torch.testing.assert_close(wrapped, direct[..., :100, :100])
    _assert_trains(model, 100)


def test_smp_pan_pads_to_128() -> None:
    # PAN's attention pyramid pools its stride-16 map three more times: smp itself fails below 128 px.
    model = SMPModel("pan", "resnet18").eval()
    assert model.size_divisor == 128
    with pytest.raises(RuntimeError):
        model.model(torch.randn(1, 3, 64, 64))


def test_smp_unknown_names_and_options_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="valid names.*deeplabv3plus.*segformer"):
        SMPModel("deeplabv4")
    assert {"unet", "unetplusplus", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "linknet", "manet", "pan",
            "upernet", "segformer"} <= set(ARCHITECTURES)
    with pytest.raises(ValueError, match="get_encoder_names"):
        SMPModel("unet", "resnet1800")
    with pytest.raises(ValueError, match="timm"):
        SMPModel("unet", "tu-not_a_timm_model")
    with pytest.raises(ValueError, match="decoder_chanels"):
        SMPModel("unet", "resnet18", decoder_chanels=[64, 32, 16, 8, 4])
    with pytest.raises(ValueError, match="logits"):
        SMPModel("unet", "resnet18", activation="softmax2d")


def _hub_reachable() -> bool:
    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _smp_weights_repo(encoder: str) -> tuple[str, str]:
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    return settings["repo_id"], settings["revision"]


def test_smp_missing_weights_offline_raise_one_fast_clear_error() -> None:
    from huggingface_hub import constants, try_to_load_from_cache

    repo_id, revision = _smp_weights_repo("resnet18")
    if isinstance(try_to_load_from_cache(repo_id, "model.safetensors", revision=revision), str):
        pytest.skip("resnet18 ImageNet weights are in the local Hugging Face cache")
    if _hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable, so the weights would download")
    offline_before = constants.HF_HUB_OFFLINE
    with pytest.raises(ModelWeightsUnavailableError) as info:
        SMPModel("unet", "resnet18", encoder_weights="imagenet")
    message = str(info.value)
    assert "'resnet18'" in message and "'imagenet'" in message
    assert "encoder_weights=null" in message and "~/.cache/huggingface" in message
    assert "\n" not in message
    assert isinstance(info.value, RuntimeError)
    assert constants.HF_HUB_OFFLINE == offline_before  # the temporary offline mode is undone


def test_smp_weights_come_from_the_local_cache_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pre-populated cache (what the error message tells users to copy) is used with no network."""
    import segmentation_models_pytorch as smp
    from huggingface_hub import constants
    from safetensors.torch import save_file

    repo_id, revision = _smp_weights_repo("resnet18")
    snapshot = tmp_path / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in smp.encoders.get_encoder("resnet18").state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.485, 0.456, 0.406]}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))

    model = SMPModel("unet", "resnet18", encoder_weights="imagenet")
    loaded = model.model.encoder.state_dict()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------------------------- configs


def _config_count(name: str) -> int:
    header = (MODEL_CONF / f"{name}.yaml").read_text()
    return int(re.search(r"([\d,]{7,}) parameters", header).group(1).replace(",", ""))


@pytest.mark.parametrize("name", ["fcn", "resunet", "pspnet", "smp", "deeplabv3plus", "pspnet_resnet"])
def test_model_configs_instantiate_with_the_documented_size(name: str) -> None:
    with initialize_config_dir(config_dir=str(MODEL_CONF), version_base="1.3"):
        cfg = compose(config_name=name)
    model = instantiate(cfg)  # Hydra hands lists over as ListConfig, as in training
    assert _keras_count(model) == _config_count(name)
    if name in ("deeplabv3plus", "pspnet_resnet"):
        assert model.arch == name.split("_")[0] and model.encoder_name == "resnet34"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)
