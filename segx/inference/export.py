"""`export_onnx`: a checkpoint's network as an ONNX file with dynamic batch, height and width, verified.

`segx-export ckpt=PATH format=onnx output=FILE.onnx [opset=17]`. The file maps normalised
float [N,3,H,W] to logits [N,21,H,W]; it is written (atomically) only after onnxruntime and PyTorch
agree on random inputs of two sizes and batch sizes (and one more size for models that pad their input).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from segx.core.errors import SegxError
from segx.core.files import atomic_path
from segx.inference.checkpoint import (
    checkpoint_classes,
    checkpoint_path,
    load_checkpoint,
    network_from_checkpoint,
    run_config,
)
from segx.models.contract import pads_input, size_divisor

FORMATS = ("onnx",)
DEFAULT_TOLERANCE = 1e-3
# (batch, height, width) of the verification inputs, rounded up to the network's size divisor unless it pads its
# input itself. 100×120 is not a multiple of 8, 16 or 32, so models that pad internally (smp) are checked with
# padding too, and with one more shape (`_fallback_shape`) where the pad reaches the input's size.
CHECK_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 64, 64), (2, 100, 120))
INPUT_NAME, OUTPUT_NAME = "image", "logits"
_DYNAMIC_AXES = {0: "batch", 2: "height", 3: "width"}


@dataclass
class ExportReport:
    """Where the model went and how closely onnxruntime reproduced PyTorch at each checked shape; the network's
    `size_divisor` and `pads_input` (segx.models.contract), as the file's metadata records them."""

    path: Path
    opset: int
    size_divisor: int
    differences: list[tuple[tuple[int, ...], float]]
    seconds: float
    pads_input: bool = False

    @property
    def input_multiple(self) -> int:
        """What the exported model's H and W must be multiples of: 1 where it pads them itself."""
        return 1 if self.pads_input else self.size_divisor

    @property
    def max_abs_difference(self) -> float:
        return max(difference for _, difference in self.differences)


class _TraceableAdaptiveAvgPool2d(nn.Module):
    """`nn.AdaptiveAvgPool2d` from an integral image, so it exports with a dynamic input size.

    The TorchScript exporter only handles adaptive pooling to 1×1 or with the input size known; bins
    here follow PyTorch's exactly (start floor(i·H/b), end ceil((i+1)·H/b)), summed in float64.
    """

    def __init__(self, output_size: tuple[int, int]) -> None:
        super().__init__()
        self.output_size = output_size

    @staticmethod
    def _edges(size: Any, bins: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(bins, device=device)
        start = torch.div(index * size, bins, rounding_mode="floor")
        end = torch.div((index + 1) * size + bins - 1, bins, rounding_mode="floor")
        return start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        integral = F.pad(x.double().cumsum(-2).cumsum(-1), (1, 0, 1, 0))
        h0, h1 = self._edges(height, self.output_size[0], x.device)
        w0, w1 = self._edges(width, self.output_size[1], x.device)

        def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return integral.index_select(-2, rows).index_select(-1, cols)

        total = corner(h1, w1) - corner(h0, w1) - corner(h1, w0) + corner(h0, w0)
        area = (h1 - h0)[:, None] * (w1 - w0)[None, :]
        return (total / area).to(x.dtype)


class _AlwaysPad(nn.Module):
    """An smp model's padding without its Python branches (a trace would freeze whether and how it padded).

    Pads bottom/right to the next multiple of `size_divisor` (by nothing where already one) and crops back. The
    reflect and replicate modes gather rows and columns by index, so the wrapper's fallback from reflect to
    replicate where a pad reaches the input's size (`segx.models.smp.wrapper.padding_mode`) is decided in the
    graph, for each input size, as the wrapper decides it in Python.
    """

    def __init__(self, wrapper: nn.Module) -> None:
        super().__init__()
        self.inner = wrapper.model
        self.size_divisor = size_divisor(wrapper)
        self.pad_mode = wrapper.pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        pad_h = (self.size_divisor - height % self.size_divisor) % self.size_divisor
        pad_w = (self.size_divisor - width % self.size_divisor) % self.size_divisor
        if self.pad_mode == "constant":
            padded = F.pad(x, (0, pad_w, 0, pad_h))
        else:
            # While tracing, sizes are tensors: `where` keeps the fallback's condition in the graph.
            replicate = torch.as_tensor(pad_h >= height) | torch.as_tensor(pad_w >= width)
            if self.pad_mode == "replicate":
                replicate = torch.ones_like(replicate)
            rows = self._index(height, pad_h, replicate, x.device)
            cols = self._index(width, pad_w, replicate, x.device)
            padded = x.index_select(-2, rows).index_select(-1, cols)
        return self.inner(padded)[..., :height, :width]

    @staticmethod
    def _index(size: Any, pad: Any, replicate: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Source indices of the `size + pad` padded positions: mirrored past the edge, or the edge repeated."""
        index = torch.arange(size + pad, device=device)
        last = torch.as_tensor(size - 1, device=device)
        reflected = torch.where(index <= last, index, 2 * last - index)  # valid wherever reflect is used
        repeated = torch.where(index <= last, index, last)
        return torch.where(replicate, repeated, reflected)


class _TraceablePSPBlock(nn.Module):
    """smp's PSPBlock, whose export path pools with `interpolate(mode="area")`: fixed-size only."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.pool = _TraceableAdaptiveAvgPool2d((int(block.pool_size), int(block.pool_size)))
        self.conv = block.pool[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2], x.shape[-1]
        return F.interpolate(self.conv(self.pool(x)), size=(height, width), mode="bilinear", align_corners=True)


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, child, module)


def traceable(net: nn.Module) -> nn.Module:
    """A copy of `net` computing the same logits with modules the TorchScript exporter keeps dynamic.

    `export_network` checks the result against the original network, so a replacement that drifted from
    what it replaces (a new smp release, say) fails the export instead of shipping wrong logits.
    """
    from segmentation_models_pytorch.decoders.pspnet.decoder import PSPBlock

    from segx.models.smp import SMPModel

    net = copy.deepcopy(net).float().cpu().eval()
    if isinstance(net, SMPModel):
        net = _AlwaysPad(net)
    for name, module in list(net.named_modules()):
        if isinstance(module, PSPBlock):
            _replace(net, name, _TraceablePSPBlock(module))
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.AdaptiveAvgPool2d):
            size = module.output_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            if None not in size and size != (1, 1):  # 1×1 exports as GlobalAveragePool at any size
                _replace(net, name, _TraceableAdaptiveAvgPool2d(size))
    return net


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def _fallback_shape(divisor: int) -> tuple[int, int, int]:
    """A (batch, height, width) whose bottom pad is at least its height (reflect falls back to replicate there)
    and whose right pad is not (the fallback covers both sides even so)."""
    side = max(1, divisor // 4)
    return 1, side, divisor + side


def input_description(net: nn.Module) -> str:
    """The `segx.input` metadata: how to prepare an input for the exported `net`."""
    sizes = ("any H and W (the model pads them to multiples of size_divisor itself)" if pads_input(net)
             else "H and W multiples of size_divisor")
    return f"float32 [N,3,H,W]: RGB scaled to [0,1], then (x - mean) / std per channel; {sizes}"


def supported_opsets() -> range:
    """Opsets torch's TorchScript exporter writes (it only warns above its maximum and writes a mislabelled file)."""
    from torch.onnx import _constants  # private, hence the fallbacks (torch 2.14's values)

    lowest = getattr(_constants, "ONNX_MIN_OPSET", 7)
    return range(lowest, getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20) + 1)


def _trace_to(net: nn.Module, path: Path, example: torch.Tensor, opset: int, name: str) -> None:
    with warnings.catch_warnings():
        # Shape checks in forward() are evaluated once while tracing (expected), and the TorchScript exporter
        # is deprecated in favour of torch.export, which does not yet keep these models' sizes dynamic.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*")
        try:
            torch.onnx.export(
                net, (example,), str(path), dynamo=False, opset_version=int(opset), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: _DYNAMIC_AXES, OUTPUT_NAME: _DYNAMIC_AXES},
                do_constant_folding=True,
            )
        except (ValueError, torch.onnx.errors.OnnxExporterError) as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if "opset" in first_line.lower():
                raise SegxError(
                    f"opset={opset} cannot be exported by torch {torch.__version__}'s ONNX exporter ({first_line}); "
                    "use opset=17 (the default) or another supported opset."
                ) from error
            raise SegxError(
                f"torch {torch.__version__}'s ONNX exporter cannot export {name} ({first_line[:300]}). "
                "This model cannot be exported to ONNX as it is; try another opset= or export another model."
            ) from error


def _add_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def verify_onnx(
    path: Path, net: nn.Module, shapes: Sequence[tuple[int, int, int]], seed: int = 0,
) -> list[tuple[tuple[int, ...], float]]:
    """Max |onnxruntime − PyTorch| of the logits at each (batch, height, width), on seeded random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    net = net.float().cpu().eval()
    differences = []
    for batch, height, width in shapes:
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.inference_mode():
            expected = net(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise SegxError(
                f"The ONNX export gives logits of shape {tuple(got.shape)} for input {tuple(x.shape)} where PyTorch "
                f"gives {tuple(expected.shape)}; the export does not handle dynamic sizes for this model."
            )
        differences.append(((batch, 3, height, width), float(abs(got - expected).max())))
    return differences


def export_network(
    net: nn.Module,
    output: str | Path,
    opset: int = 17,
    tolerance: float = DEFAULT_TOLERANCE,
    example_size: int = 64,
    metadata: Mapping[str, Any] | None = None,
) -> ExportReport:
    """Export `net` (normalised float [N,3,H,W] → logits) with dynamic N, H, W; the file appears only if verified."""
    start = time.perf_counter()
    opsets = supported_opsets()
    if int(opset) not in opsets:
        raise SegxError(
            f"opset={opset} is outside what torch {torch.__version__}'s ONNX exporter writes ({opsets.start} to "
            f"{opsets.stop - 1}); use opset=17 (the default) or another in that range."
        )
    output = Path(output).expanduser()
    if output.is_dir():
        raise SegxError(
            f"output={output} is a folder; pass the path of the .onnx file to write, e.g. {output}/model.onnx."
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    divisor, pads = size_divisor(net), pads_input(net)
    multiple = 1 if pads else divisor
    side = _round_up(example_size, multiple)
    example = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(1))
    shapes = [(b, _round_up(h, multiple), _round_up(w, multiple)) for b, h, w in CHECK_SHAPES]
    if pads and divisor > 1:
        shapes.append(_fallback_shape(divisor))
    with atomic_path(output) as tmp:  # the file appears only once verified
        _trace_to(traceable(net), tmp, example, opset, type(net).__name__)
        _add_metadata(tmp, {"size_divisor": divisor, "pads_input": pads, "segx.input": input_description(net),
                            **dict(metadata or {})})
        differences = verify_onnx(tmp, net, shapes)  # against the original network, not the traced copy
        worst = max(d for _, d in differences)
        if not worst <= tolerance:  # NaN fails too
            measured = ", ".join(f"{d:.3g} at {list(s)}" for s, d in differences)
            raise SegxError(
                f"The ONNX export of {type(net).__name__} does not reproduce PyTorch: max abs difference of the "
                f"logits {measured}, above the tolerance {tolerance:g}, so {output} was not written. Try another "
                "opset= or report the model."
            )
    return ExportReport(output, int(opset), divisor, differences, time.perf_counter() - start, pads)


def export_checkpoint(
    ckpt: str | Path, output: str | Path, format: str = "onnx", opset: int = 17,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """The command's dispatch: refuse formats other than ONNX before any work is done."""
    if str(format).lower() not in FORMATS:
        raise SegxError(
            f"format={format} is not supported; segx exports format=onnx only (onnxruntime, TensorRT and "
            "OpenVINO all read it)."
        )
    return export_onnx(ckpt, output, opset=opset, tolerance=tolerance)


def export_onnx(
    ckpt: str | Path, output: str | Path, opset: int = 17, tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export a checkpoint's network, recording in the file's metadata how inputs must be prepared."""
    ckpt = checkpoint_path(ckpt)  # a file, or an MLflow models:/ or runs:/ URI
    checkpoint = load_checkpoint(ckpt)
    config = run_config(checkpoint)
    net = network_from_checkpoint(checkpoint)
    data = config.data
    class_names, _ = checkpoint_classes(checkpoint)  # the dataset's, also where a classes file named them
    metadata = {
        "segx.output": "float32 logits [N,num_classes,H,W]; argmax over dim 1 gives the class index",
        "mean": list(data.mean),
        "std": list(data.std),
        "channel_order": str(data.get("channel_order", "rgb")),  # bgr: reverse the RGB channels before mean/std
        "interpolation": str(data.get("interpolation", "antialias")),  # cv2: bilinear resize without antialiasing
        "image_size": int(data.image_size),
        "resize": str(data.get("resize", "square")),  # keep_ratio: longer side to image_size, padded bottom-right
        "num_classes": len(class_names),
        "class_names": class_names,
        "checkpoint": str(Path(ckpt).expanduser().resolve()),
    }
    return export_network(net, output, opset=opset, tolerance=tolerance, example_size=int(data.image_size),
                          metadata=metadata)
