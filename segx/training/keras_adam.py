"""Adam and Adamax as Keras updates them (`optimizer.keras_epsilon=true`). Keras adds Adam's epsilon to sqrt(v)
before the bias correction ("epsilon hat"), PyTorch after: with the study's epsilon 1e-7, Keras' early steps are
several times smaller for small gradients, so reproducing its training needs Keras' formula."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class _KerasOptimizer(Optimizer):
    """The loop both share: the L2 term added to the gradient as PyTorch does, then one `_update` per parameter."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-7, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if group["weight_decay"]:
                    grad = grad.add(param, alpha=group["weight_decay"])
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["second"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                state["step"] += 1
                self._update(param, grad, state, group)
        return loss

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        raise NotImplementedError


class KerasAdam(_KerasOptimizer):
    """p ← p − lr · sqrt(1 − β₂ᵗ) / (1 − β₁ᵗ) · m / (sqrt(v) + ε), Keras 3's and tf.keras 2's Adam; `weight_decay`
    adds an L2 term to the gradient as torch.optim.Adam does."""

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        t, m, v = state["step"], state["exp_avg"], state["second"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        param.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-step_size)


class KerasAdamax(_KerasOptimizer):
    """p ← p − lr / (1 − β₁ᵗ) · m / (u + ε) with u = max(β₂ u, |g|), Keras' Adamax (PyTorch puts ε inside the max)."""

    def _update(self, param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
        beta1, beta2 = group["betas"]
        m, u = state["exp_avg"], state["second"]
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        torch.maximum(u.mul_(beta2), grad.abs(), out=u)
        param.addcdiv_(m, u + group["eps"], value=-group["lr"] / (1 - beta1 ** state["step"]))
