"""Per-step schedules of the learning rate and of SogCLR's gamma: plain functions of the step index.

Being pure functions of (step, totals), they need no state in checkpoints: a resumed run recomputes the
same values from its step counter. `step` is the 0-based index of the optimizer step about to be taken.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warmup from 0, then a half-cosine from `peak` to 0; MoCo v3's rule, evaluated per step.

    MoCo v3 (and the SogCLR reference) use lr = peak * e / warmup_epochs with the fractional epoch
    e = step / steps_per_epoch, so in steps:
        step < warmup_steps:  peak * step / warmup_steps  (0 at step 0, as in the reference)
        otherwise:            peak * 0.5 * (1 + cos(pi * (step - warmup) / (total_steps - warmup)))
    The cosine's progress is capped at 1, so steps past `total_steps` stay at 0.
    """
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def gamma_at(step: int, total_steps: int, gamma: float, schedule: str, decay_fraction: float) -> float:
    """SogCLR's moving-average weight at `step`.

    constant: `gamma` throughout. cosine (LibAUC's schedule, per step instead of per epoch): from 1 at
    step 0 down to `gamma` along a half-cosine over the first `decay_fraction` of training, then `gamma`.
    """
    if schedule == "constant":
        return gamma
    if schedule != "cosine":
        raise ValueError(f"unknown gamma schedule {schedule!r}; expected constant or cosine")
    decay_steps = decay_fraction * total_steps
    if step >= decay_steps:
        return gamma
    return gamma + (1.0 - gamma) * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group the same learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr
