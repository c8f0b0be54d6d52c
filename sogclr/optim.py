"""Optimizers: LARS (the SogCLR / MoCo v3 recipe), momentum SGD and AdamW, and learning-rate scaling.

All three are built on the same parameter split (`param_groups`): weight decay only on parameters with
more than one dimension; BN weights and biases (1-D) get none. LARS applies that rule by shape itself and
additionally leaves 1-D parameters out of the trust ratio, so passing it the split changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.optimizer import ParamsT


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling with momentum, as in MoCo v3 and the SogCLR reference.

    For each parameter p with ndim > 1 and gradient g:
        g <- g + weight_decay * p
        g <- g * trust_coefficient * ||p|| / ||g||     (ratio 1 when either norm is 0)
    then, for every parameter, mu <- momentum * mu + g and p <- p - lr * mu.
    Parameters with ndim <= 1 (BN weights and biases, biases) skip both the decay and the trust ratio.
    The step uses foreach kernels and never reads a value back to the host; it assumes the parameters
    of a group share one device (the trust ratios of a group are computed as one stacked tensor).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(
                f"LARS needs lr >= 0, weight_decay >= 0, 0 <= momentum < 1, trust_coefficient > 0; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, "
                f"trust_coefficient={trust_coefficient}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        with_grad = [p for p in group["params"] if p.grad is not None]
        if not with_grad:
            return
        matrices = [p for p in with_grad if p.ndim > 1]
        vectors = [p for p in with_grad if p.ndim <= 1]
        updates = _trust_scaled_updates(matrices, group["weight_decay"], group["trust_coefficient"])
        updates += [p.grad for p in vectors]
        params = matrices + vectors
        buffers = [self._momentum_buffer(p) for p in params]
        torch._foreach_mul_(buffers, group["momentum"])
        torch._foreach_add_(buffers, updates)
        torch._foreach_add_(params, buffers, alpha=-group["lr"])

    def _momentum_buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state["mu"]


def _trust_scaled_updates(
    params: list[torch.Tensor], weight_decay: float, trust_coefficient: float
) -> list[torch.Tensor]:
    """(g + wd * p) scaled by each tensor's trust ratio; new tensors, the .grad fields stay untouched."""
    if not params:
        return []
    updates = list(torch._foreach_add([p.grad for p in params], params, alpha=weight_decay))
    param_norms = torch.stack(torch._foreach_norm(params))
    update_norms = torch.stack(torch._foreach_norm(updates))
    # torch.where instead of a Python branch: no host sync; the discarded inf/nan of x/0 never propagates.
    ratios = torch.where(
        (param_norms > 0) & (update_norms > 0),
        trust_coefficient * param_norms / update_norms,
        torch.ones_like(param_norms),
    )
    torch._foreach_mul_(updates, ratios.unbind())
    return updates


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split in two groups: ndim > 1 with `weight_decay`, ndim <= 1 with none.

    Frozen parameters (requires_grad False) are left out; empty groups are dropped.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def scaled_lr(base_lr: float, batch_size: int, scaling: str) -> float:
    """Peak learning rate for a global batch: sqrt (base * sqrt(batch)), linear (base * batch / 256), none."""
    if scaling == "sqrt":
        return base_lr * math.sqrt(batch_size)
    if scaling == "linear":
        return base_lr * batch_size / 256
    if scaling == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling {scaling!r}; expected sqrt, linear or none")


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    momentum: float,
    trust_coefficient: float = 0.001,
) -> torch.optim.Optimizer:
    """LARS, momentum SGD or AdamW (beta1 = momentum) over `param_groups(model, weight_decay)`.

    Build it after the model is on its device: AdamW uses the fused kernel (CPU and CUDA).
    """
    groups = param_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999), fused=True)
    raise ValueError(f"unknown optimizer {name!r}; expected lars, sgd or adamw")
