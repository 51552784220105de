"""The one inference path: evaluation, prediction, the report's examples and the timing protocol all run here.

`torch.inference_mode`, large batches, the precision `inference_precision` picks (autocast) and the run's memory
format, so a score, a saved mask and a timing all come from the same computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import ConfigError
from segx.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from segx.models import run_options
from segx.models.contract import size_divisor
from segx.models.memory_format import MemoryFormat, choose_memory_format, probe_channels_last

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_HALF_TRUE = {"bf16-true": "bf16-mixed", "bf16": "bf16-mixed", "16-true": "16-mixed", "16": "16-mixed"}
TTA_MODES = ("none", "flip", "ms_flip")
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's aug-test


@dataclass(frozen=True)
class TestTimeAugmentation:
    """What one prediction averages: `flip` the image and its mirror; `ms_flip` both at every scale of `scales`
    (each side rounded to the network's size divisor). Softmax probabilities are averaged (`probabilities`), or
    raw logits."""

    __test__ = False  # pytest: not a test class, despite its name
    mode: str = "none"
    scales: tuple[float, ...] = TTA_SCALES
    probabilities: bool = True

    def __post_init__(self) -> None:
        if self.mode not in TTA_MODES:
            raise ConfigError(f"tta={self.mode!r} is not a choice; use none, flip (the image and its mirror) or "
                              "ms_flip (both at every scale of tta_scales).")
        if self.mode == "ms_flip" and (not self.scales or min(self.scales) <= 0):
            raise ConfigError(f"tta_scales={list(self.scales)} needs at least one positive scale (e.g. "
                              "[0.5,0.75,1.0,1.25,1.5,1.75]).")

    @property
    def label(self) -> str:
        """How a score made with it is labelled ("" without TTA)."""
        return {"none": "", "flip": "flip", "ms_flip": "ms+flip"}[self.mode]


def tta_from_config(cfg: Any) -> TestTimeAugmentation:
    """`tta`, `tta_scales` and `tta_probabilities` of an entry point's config."""
    return TestTimeAugmentation(str(cfg.get("tta", "none")), tuple(float(s) for s in cfg.get("tta_scales", TTA_SCALES)),
                                bool(cfg.get("tta_probabilities", True)))


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Lightning's mixed precision as a context: autocast for `*-mixed`, nothing for `32-true`."""
    dtype = AUTOCAST_DTYPES.get(str(precision))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


INFERENCE_PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


def cpu_has_bf16_units() -> bool:
    """Whether this CPU has bf16 matrix instructions (AMX tiles or AVX512-BF16), which oneDNN's bf16 convolutions
    use; without them bf16 is emulated and slower than fp32."""
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    return any(bool(probe()) for probe in probes if probe is not None)


def inference_precision(precision: str | int, device: torch.device, setting: str = "auto") -> str:
    """The precision to predict in: `setting` (`inference.precision`) when not `auto`; `auto` is bf16-mixed on a
    CPU with bf16 units (`cpu_has_bf16_units`), else fp32, and on CUDA follows the run's `trainer.precision`
    (`precision`): its `auto` is bf16-mixed where the GPU has bf16, `*-true` half precisions run as autocast."""
    setting = str(setting)
    if setting not in INFERENCE_PRECISIONS:
        raise ConfigError(f"inference.precision={setting!r} is not a choice; use one of "
                          f"{', '.join(INFERENCE_PRECISIONS)} (auto: bf16 where the CPU or GPU has bf16 units).")
    if device.type != "cuda":
        if setting == "16-mixed":
            raise ConfigError("inference.precision=16-mixed is for CUDA GPUs; on a CPU use bf16-mixed, 32-true or "
                              "auto.")
        if setting == "auto":
            return "bf16-mixed" if cpu_has_bf16_units() else "32-true"
        return setting
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    if setting == "bf16-mixed" and not bf16:
        raise ConfigError(f"inference.precision=bf16-mixed was asked for but {torch.cuda.get_device_name(device)} "
                          "has no bf16 support; use 16-mixed, 32-true or auto.")
    if setting != "auto":
        return setting
    precision = str(precision)
    if precision == "auto":
        return "bf16-mixed" if bf16 else "32-true"
    precision = _HALF_TRUE.get(precision, precision)
    if precision == "16-mixed" or (precision == "bf16-mixed" and bf16):
        return precision
    return "32-true"  # 32-true, 64-true, or a bf16 run predicted on a GPU without bf16


def inference_memory_format(config: Any, net: nn.Module, device: torch.device | str, batch_size: int) -> MemoryFormat:
    """The memory format to predict with for a run's `config`: its `run.channels_last` (`model.channels_last` in a
    checkpoint written before the `run` node), decided for this device; `probe` times forward passes of `net` on a
    CPU at up to `batch_size` images of `data.image_size`."""
    setting = run_options(config)["channels_last"]
    size = int((config.get("data") or {}).get("image_size") or 0)
    probe = (lambda: probe_channels_last(net, batch_size, size, training=False)) if size > 0 else None
    return choose_memory_format(setting, device, probe, "no data.image_size to time")


class Predictor:
    """A network ready to predict uint8 images: on its device, in eval mode, in its memory format.

    `logits` takes one batch; `labels` walks a whole tensor of images in batches of `batch_size`.
    """

    def __init__(
        self,
        net: nn.Module,
        device: torch.device | str = "cpu",
        precision: str = "32-true",
        channels_last: bool = True,
        normalize: Normalize | None = None,
        batch_size: int = 64,
        tta: TestTimeAugmentation | None = None,
    ) -> None:
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1.")
        self.device = torch.device(device)
        self.precision = str(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(self.device).to(memory_format=self.memory_format).eval()
        self.normalize = normalize or Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.batch_size = int(batch_size)
        self.tta = tta or TestTimeAugmentation()
        self.divisor = size_divisor(net)

    @classmethod
    def from_run(cls, net: nn.Module, config: Any, device: torch.device, batch_size: int = 64,
                 tta: TestTimeAugmentation | None = None, precision: str = "auto") -> Predictor:
        """For a network trained with `config` (a run's resolved config, e.g. from its checkpoint), in the memory
        format of its `run.channels_last` (`inference_memory_format`) and `inference_precision(..., precision)`."""
        data = config.get("data") or {}
        trainer = config.get("trainer") or {}
        memory_format = inference_memory_format(config, net, device, batch_size)
        return cls(net, device, inference_precision(trainer.get("precision", "auto"), device, precision),
                   channels_last=memory_format.channels_last,
                   normalize=Normalize(list(data.get("mean", IMAGENET_MEAN)), list(data.get("std", IMAGENET_STD)),
                                       str(data.get("channel_order", "rgb"))),
                   batch_size=batch_size, tta=tta)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        with autocast_for(self.precision, self.device):
            return self.net(batch.contiguous(memory_format=self.memory_format))

    def _scaled_side(self, side: int, scale: float) -> int:
        return max(self.divisor, round(side * scale / self.divisor) * self.divisor)

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] (any device) → logits [N,C,H,W] on this device, in the autocast dtype when mixed; with
        test-time augmentation the float32 mean of the passes' probabilities (or logits)."""
        return self.normalized_logits(self.normalize(images.to(self.device, non_blocking=True)))

    @torch.inference_mode()
    def normalized_logits(self, batch: torch.Tensor) -> torch.Tensor:
        """`logits` of a batch already normalised and on this device (the sliding windows' path)."""
        if self.tta.mode == "none":
            return self._forward(batch)
        height, width = batch.shape[-2:]
        scales = self.tta.scales if self.tta.mode == "ms_flip" else (1.0,)
        total: torch.Tensor | None = None
        passes = 0
        for scale in scales:
            size = (self._scaled_side(height, scale), self._scaled_side(width, scale))
            scaled = batch if size == (height, width) else F.interpolate(batch, size=size, mode="bilinear",
                                                                         align_corners=False)
            for mirrored in (False, True):
                out = self._forward(scaled.flip(-1) if mirrored else scaled).float()
                out = out.flip(-1) if mirrored else out
                if out.shape[-2:] != (height, width):
                    out = F.interpolate(out, size=(height, width), mode="bilinear", align_corners=False)
                out = out.softmax(1) if self.tta.probabilities else out
                total = out if total is None else total + out
                passes += 1
        assert total is not None
        return total / passes

    @torch.inference_mode()
    def batches(self, images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, logits) for each batch of `images` uint8 [N,3,H,W]."""
        for begin in range(0, len(images), self.batch_size):
            yield begin, self.logits(images[begin:begin + self.batch_size])

    @torch.inference_mode()
    def labels(self, images: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first index, argmax labels [B,H,W] on this device) for each batch."""
        for begin, logits in self.batches(images):
            yield begin, logits.argmax(1)

    def synchronize(self) -> None:
        """Wait for the device (timings must include the queued GPU work)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
