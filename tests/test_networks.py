"""FCN, ResUNet, PSPNet and the smp wrapper: the study's exact FCN, shapes, gradients, padding, configs, offline errors.

Everything runs on the CPU with narrow widths or small encoders; the whole file takes well under a minute.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import types
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from segx.core.errors import SegxError
from segx.models.fcn import FCN
from segx.models.pspnet import PSPNet
from segx.models.resunet import ResUNet
from segx.models.smp import ARCHITECTURES, ModelWeightsUnavailableError, SMPModel, fetch_pretrained

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
    with pytest.raises(ValueError, match="classifier_activation must be null or 'relu', got 'softmax'"):
        FCN(classifier_activation="softmax")
    with pytest.raises(ValueError, match="classifier_init must be one of \\['glorot', 'he_normal'\\]"):
        FCN(classifier_init="he_uniform")


def test_fcn_study_classifier_is_relu_and_he_normal() -> None:
    model = FCN(widths=NARROW, fc_width=32, classifier_activation="relu", classifier_init="he_normal").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).min() >= 0  # the study's scores before its softmax
    std = model.classifier.weight.std().item()  # he_normal: sqrt(2 / 32); glorot: sqrt(2 / (32 + 21))
    assert std == pytest.approx((2 / 32) ** 0.5, rel=0.15) and (model.classifier.bias == 0).all()


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


class _NoNetwork(Exception):
    """What the socket guard raises: not an OSError, so no caller can mistake it for a failed download."""


@contextlib.contextmanager
def _hub_settings_frozen() -> Iterator[None]:
    """Any assignment to a huggingface_hub.constants attribute (HF_HUB_OFFLINE, HF_HUB_CACHE...) fails,
    even one undone afterwards; the HF_* environment must be the same at the end."""
    from huggingface_hub import constants

    class ReadOnly(types.ModuleType):
        def __setattr__(self, name: str, value: object) -> None:
            if name != "__class__":
                raise AssertionError(f"huggingface_hub.constants.{name} was set to {value!r}")
            super().__setattr__(name, value)

    environment = {k: v for k, v in os.environ.items() if k.startswith("HF_")}
    constants.__class__ = ReadOnly
    try:
        yield
    finally:
        constants.__class__ = types.ModuleType
    assert {k: v for k, v in os.environ.items() if k.startswith("HF_")} == environment


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every name lookup and socket connection raises; returns the hosts that were asked for."""
    lookups: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        raise _NoNetwork(f"network access: {args[:2]}")

    def no_dns(host: str, *args: object, **kwargs: object) -> None:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: no network)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return lookups


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch hub caches (huggingface_hub reads its cache path at call time)."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(name, raising=False)
    return hub


SMP_CFG = {"_target_": "segx.models.smp.SMPModel", "arch": "unet", "encoder": "resnet18",
           "encoder_weights": "imagenet"}


def _smp_weights_repo(encoder: str) -> tuple[str, str]:
    import segmentation_models_pytorch as smp

    settings = smp.encoders.encoders[encoder]["pretrained_settings"]["imagenet"]
    return settings["repo_id"], settings["revision"]


def _hub_snapshot(cache: Path, repo_id: str, revision: str, ref: str | None = None) -> Path:
    """A snapshot folder laid out as huggingface_hub does; `ref` (e.g. main) points a branch at it."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    if ref is not None:
        (repo / "refs").mkdir()
        (repo / "refs" / ref).write_text(revision)
    return snapshot


def _no_retries(lookups: list[str]) -> bool:
    """One request for the weights; huggingface_hub may add one of its own per process (its agent registry).
    The Hub client's retry loop would make six for the weights alone."""
    return set(lookups) == {"huggingface.co"} and len(lookups) <= 2


def test_smp_from_scratch_opens_no_socket_and_leaves_hub_settings_alone(no_network: list[str]) -> None:
    with _hub_settings_frozen():
        model = SMPModel("unet", "resnet18", encoder_weights=None)
    assert no_network == []
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 21, 64, 64)


def test_smp_constructor_never_downloads(no_network: list[str], empty_hub_cache: Path) -> None:
    """Weights missing from the cache: not even a name lookup, and a paragraph saying who fetches them."""
    started = time.perf_counter()
    with _hub_settings_frozen(), pytest.raises(ModelWeightsUnavailableError) as info:
        SMPModel("unet", "resnet18", encoder_weights="imagenet")
    assert time.perf_counter() - started < 5
    assert no_network == []
    assert list(empty_hub_cache.iterdir()) == []
    message = str(info.value)
    assert "model.encoder_weights='imagenet'" in message and "'resnet18'" in message
    assert "not in the local cache" in message and str(empty_hub_cache) in message
    assert torch.hub.get_dir() in message and "HF_HOME" in message and "TORCH_HOME" in message
    assert "python train.py" in message and "segx.models.smp.fetch_pretrained(cfg.model)" in message
    assert "model.encoder_weights=null" in message and "from scratch" in message
    assert "\n" not in message


def test_fetch_pretrained_offline_raises_one_fast_clear_error(no_network: list[str], empty_hub_cache: Path) -> None:
    started = time.perf_counter()
    with _hub_settings_frozen(), pytest.raises(SegxError) as info:
        fetch_pretrained(OmegaConf.create(SMP_CFG))
    seconds = time.perf_counter() - started
    assert isinstance(info.value, ModelWeightsUnavailableError)
    assert seconds < 5, f"{seconds:.1f} s: the Hub client's retry loop ran"
    assert _no_retries(no_network), no_network
    message = str(info.value)
    assert "model.encoder_weights='imagenet'" in message and "'resnet18'" in message
    assert "model.encoder_weights=null" in message and "from scratch" in message
    assert str(empty_hub_cache) in message and "~/.cache/huggingface" in message and "HF_HOME" in message
    assert "TORCH_HOME" in message and "Name or service not known" in message
    assert "\n" not in message


def test_fetch_pretrained_on_this_machine_fails_fast_without_network_mocks(empty_hub_cache: Path) -> None:
    """The same with the machine's real network: here (no internet) a real DNS/connection failure."""
    started = time.perf_counter()
    try:
        with _hub_settings_frozen():
            fetch_pretrained(SMP_CFG)
    except ModelWeightsUnavailableError as error:
        assert "model.encoder_weights=null" in str(error)
        assert time.perf_counter() - started < 15  # one request with a 10 s timeout, never the retry loop
    else:
        pytest.skip("the Hugging Face Hub is reachable here, so the weights downloaded")


def test_fetch_pretrained_knows_every_name_of_the_wrapper() -> None:
    """The targets `fetch_pretrained` acts on are SMPModel's, conf/model/smp.yaml's among them."""
    from hydra.utils import get_class

    from segx.models.smp.weights import SMP_TARGETS

    assert all(get_class(target) is SMPModel for target in SMP_TARGETS)
    assert OmegaConf.load(MODEL_CONF / "smp.yaml")._target_ in SMP_TARGETS


def test_fetch_pretrained_leaves_other_configs_alone(no_network: list[str], empty_hub_cache: Path) -> None:
    """Other models and `encoder_weights: null` fetch nothing; a misspelt name fails before any request."""
    fetch_pretrained({"_target_": "segx.models.unet.UNet", "encoder_weights": "imagenet"})
    fetch_pretrained({**SMP_CFG, "encoder_weights": None})
    fetch_pretrained({"_target_": SMP_CFG["_target_"]})
    with pytest.raises(ValueError, match="resnet1800"):
        fetch_pretrained({**SMP_CFG, "encoder": "resnet1800"})
    with pytest.raises(ValueError, match="'instagram'"):
        fetch_pretrained({**SMP_CFG, "encoder_weights": "instagram"})
    assert no_network == []


@pytest.mark.parametrize("variable", ["RANK", "LOCAL_RANK", "SLURM_PROCID"])
def test_smp_only_rank_zero_fetches_weights(
    variable: str, no_network: list[str], empty_hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher's rank variables decide, as in a fresh process before Lightning has read them."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", None)  # segx.core.ranks then reads the environment
    monkeypatch.setenv(variable, "1")
    with _hub_settings_frozen():
        fetch_pretrained(SMP_CFG)  # nothing to do off rank 0
        model = SMPModel("unet", "resnet18", encoder_weights="imagenet")  # DDP brings rank 0's weights
    assert no_network == []
    assert model.model.encoder.conv1.weight.shape == (64, 3, 7, 7)
    monkeypatch.setenv(variable, "0")
    with pytest.raises(ModelWeightsUnavailableError, match="not in the local cache"):
        SMPModel("unet", "resnet18", encoder_weights="imagenet")
    assert no_network == []
    with pytest.raises(ModelWeightsUnavailableError, match="downloading them failed"):
        fetch_pretrained(SMP_CFG)
    assert _no_retries(no_network), no_network


def test_smp_weights_come_from_the_local_cache_without_network(
    empty_hub_cache: Path, no_network: list[str]
) -> None:
    """A pre-populated cache (what the error message tells users to copy) is used with no network: smp pins
    a commit, so its `hf_hub_download` answers from the cache."""
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    snapshot = _hub_snapshot(empty_hub_cache, *_smp_weights_repo("resnet18"))
    weights = {k: v.contiguous() for k, v in smp.encoders.get_encoder("resnet18").state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.485, 0.456, 0.406]}))

    with _hub_settings_frozen():
        fetch_pretrained(OmegaConf.create(SMP_CFG))  # already cached: nothing to fetch
        model = SMPModel("unet", "resnet18", encoder_weights="imagenet")
    assert no_network == []
    loaded = model.model.encoder.state_dict()
    for key, value in weights.items():
        assert torch.equal(loaded[key], value), key


def test_every_smp_weights_setting_pins_a_commit() -> None:
    """What the constructor relies on: with a branch name, `hf_hub_download` would ask the Hub even for a
    cached file."""
    import segmentation_models_pytorch as smp

    revisions = {(name, weights): settings.get("revision") for name, encoder in smp.encoders.encoders.items()
                 for weights, settings in encoder["pretrained_settings"].items()}
    assert revisions
    assert {key: r for key, r in revisions.items() if not re.fullmatch(r"[0-9a-f]{40}", str(r))} == {}


def test_timm_hub_weights_come_from_the_local_cache_without_network(
    empty_hub_cache: Path, no_network: list[str]
) -> None:
    """timm pins no commit, so left to itself it would ask the Hub whether its cached copy is current."""
    import timm
    from safetensors.torch import save_file

    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    snapshot = _hub_snapshot(empty_hub_cache, hub_id, "0" * 40, ref="main")
    weights = {k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}
    save_file(weights, str(snapshot / "model.safetensors"))

    with _hub_settings_frozen():
        fetch_pretrained({**SMP_CFG, "encoder": "tu-resnet18", "encoder_weights": True})
        model = SMPModel("unet", "tu-resnet18", encoder_weights=True)
    assert no_network == []
    assert torch.equal(model.model.encoder.model.conv1.weight, weights["conv1.weight"])


def test_timm_torch_hub_weights_are_looked_up_in_torch_hubs_folder(
    empty_hub_cache: Path, no_network: list[str]
) -> None:
    """A few timm models have no copy on the Hub, only a URL that torch hub caches in its checkpoints folder."""
    import timm

    encoder, cfg = "tu-legacy_seresnet18", {**SMP_CFG, "encoder": "tu-legacy_seresnet18", "encoder_weights": True}
    with pytest.raises(ModelWeightsUnavailableError, match="not in the local cache"):
        SMPModel("unet", encoder, encoder_weights=True)
    assert no_network == []
    with pytest.raises(ModelWeightsUnavailableError, match="downloading them failed"):
        fetch_pretrained(cfg)
    assert len(no_network) == 1, no_network  # urllib: one lookup, no retries

    url = timm.models.get_pretrained_cfg(encoder[3:]).url
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)  # fetch_pretrained made it
    weights = timm.create_model(encoder[3:]).state_dict()
    torch.save(weights, checkpoints / Path(urllib.parse.urlparse(url).path).name)
    fetch_pretrained(cfg)
    model = SMPModel("unet", encoder, encoder_weights=True)
    assert len(no_network) == 1
    assert torch.equal(model.model.encoder.model.layer0.conv1.weight, weights["layer0.conv1.weight"])


def test_train_fetches_the_weights_before_building_the_model(
    no_network: list[str], empty_hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from segx.runs.job import JobInfo

    training = importlib.import_module("segx.training.train")  # the module, not its `train` function

    def build(*args: object, **kwargs: object) -> None:
        raise AssertionError("train() built the model before fetching its weights")

    monkeypatch.setattr(training, "build_network", build)
    monkeypatch.setattr(training, "_route_lightning_logs", lambda: None)  # leave the test's logging alone
    for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):  # seed_everything sets them; undone afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    with initialize_config_dir(config_dir=str(MODEL_CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides=["model=smp", "model.encoder=resnet18", "model.encoder_weights=imagenet"])
    with _hub_settings_frozen(), pytest.raises(ModelWeightsUnavailableError, match="downloading them failed"):
        training.train(cfg, JobInfo(tmp_path / "run"))
    assert _no_retries(no_network), no_network


# ---------------------------------------------------------------------------------------- configs


def _config_count(name: str) -> int:
    header = (MODEL_CONF / f"{name}.yaml").read_text()
    return int(re.search(r"([\d,]{7,}) parameters", header).group(1).replace(",", ""))


@pytest.mark.parametrize("name", ["fcn", "resunet", "pspnet", "smp", "deeplabv3plus", "pspnet_resnet", "fcn_study",
                                  "resunet_study", "pspnet_study"])
def test_model_configs_instantiate_with_the_documented_size(name: str) -> None:
    with initialize_config_dir(config_dir=str(MODEL_CONF), version_base="1.3"):
        cfg = compose(config_name=name)
    device = "meta" if name == "resunet_study" else "cpu"  # 401.6M parameters (1.6 GB): shapes only
    with torch.device(device):
        model = instantiate(cfg)  # Hydra hands lists over as ListConfig, as in training
    assert _keras_count(model) == _config_count(name)
    if name in ("deeplabv3plus", "pspnet_resnet"):
        assert model.arch == name.split("_")[0] and model.encoder_name == "resnet34"
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64, device=device)).shape == (1, 21, 64, 64)
