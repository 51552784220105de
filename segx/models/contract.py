"""What every segx network declares about the input sizes it takes, and the one check of an input size.

`hydra.utils.instantiate(cfg.model)` returns a module mapping float [N,C,H,W] to logits [N,classes,H,W]. Besides
that, a network states `size_divisor` (H and W must be multiples of it; 1 for any size) and `pads_input` (it pads
to that multiple itself and crops back, so any size works and the divisor only says what it pads to). Export,
inference and the build-time check read these through `size_divisor(net)` and `pads_input(net)`.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segx.core.errors import ConfigError, find_user_error

__all__ = ["SegmentationNetwork", "check_divisible", "check_input_size", "meta_forward", "pads_input",
           "size_divisor", "unwrap"]


@runtime_checkable
class SegmentationNetwork(Protocol):
    """The attributes a segx network sets (on the instance or its class) beside its `forward`."""

    #: H and W must be multiples of this (after the network's own padding, if `pads_input`); 1 for any size.
    size_divisor: int
    #: True when the network pads H and W to `size_divisor` itself and crops the logits back.
    pads_input: bool


def unwrap(net: nn.Module) -> nn.Module:
    """The module `torch.compile(net)` wraps (its `_orig_mod`), or `net` itself."""
    # Only a process that imported dynamo can hold a compiled module; importing it here would cost seconds.
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return net._orig_mod if dynamo is not None and isinstance(net, dynamo.OptimizedModule) else net


def size_divisor(net: nn.Module) -> int:
    """The multiple of H and W the network needs (or pads to, see `pads_input`); 1 for a network declaring none.

    A network outside segx that declares nothing is taken at its word that any size works; the build-time
    `check_input_size` still runs it once at the configured size.
    """
    net = unwrap(net)
    if not isinstance(net, SegmentationNetwork):
        return 1
    divisor = net.size_divisor
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise TypeError(f"{type(net).__name__}.size_divisor must be a positive int, got {divisor!r}")
    return divisor


def pads_input(net: nn.Module) -> bool:
    """Whether the network pads its input to `size_divisor` itself (so any H, W works); False if undeclared."""
    net = unwrap(net)
    if not isinstance(net, SegmentationNetwork):
        return False
    if not isinstance(net.pads_input, bool):
        raise TypeError(f"{type(net).__name__}.pads_input must be a bool, got {net.pads_input!r}")
    return net.pads_input


def check_divisible(net: nn.Module, size: Sequence[int] | int, what: str | None = None) -> None:
    """Refuse an input H×W (`size`, or one side for a square) that is not a multiple of the network's divisor.

    The one place this message is written: the networks call it in `forward`, `check_input_size` before any data
    is read. `what` names the network in the message (its class name by default).
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
    if pads_input(net):
        return
    divisor = size_divisor(net)
    if height % divisor or width % divisor:
        raise ConfigError(
            f"{what or type(unwrap(net)).__name__} needs height and width divisible by {divisor}, got "
            f"{(height, width)}; choose data.image_size accordingly."
        )


def meta_forward(net: nn.Module, image_size: int, in_channels: int = 3) -> tuple[torch.Tensor, int]:
    """The logits of one image and the floating-point operations of computing them (a multiply-add counts 2),
    from a forward pass of a copy on PyTorch's meta device: shapes only, no arithmetic, no activation memory.
    Raises what the network raises; NotImplementedError for an operation without a meta kernel."""
    probe = copy.deepcopy(unwrap(net)).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        logits = probe(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    return logits, int(counter.get_total_flops())


def check_input_size(net: nn.Module, image_size: int, model_name: str = "the model") -> int:
    """Refuse a `data.image_size` the network cannot take before any data is read: its declared divisor first
    (`check_divisible`), then one meta-device forward pass for what a divisor cannot express. Returns the
    forward FLOPs per image that pass counted (0 when an operation has no meta kernel, and then the first real
    forward pass checks the rest)."""
    if image_size < 1:  # 0 and -16 are multiples of 16 too
        divisor = 1 if pads_input(net) else size_divisor(net)
        raise ConfigError(f"data.image_size={image_size} cannot be used with {model_name}: it must be a positive "
                          + (f"multiple of {divisor}" if divisor > 1 else "number") + " (the study used 128).")
    try:
        check_divisible(net, image_size)
        logits, flops = meta_forward(net, image_size)
    except NotImplementedError:
        return 0
    except Exception as error:
        reason = str(find_user_error(error) or error).strip()
        if "image_size" not in reason:
            reason += " Choose another data.image_size (the study used 128) or another model."
        raise ConfigError(f"data.image_size={image_size} cannot be used with {model_name}: {reason}") from error
    if tuple(logits.shape[-2:]) != (image_size, image_size):
        raise ConfigError(
            f"{model_name} turns {image_size}×{image_size} images into {tuple(logits.shape[-2:])} logits, not "
            f"{image_size}×{image_size}; choose a data.image_size it maps to itself (the study used 128)."
        )
    return flops
