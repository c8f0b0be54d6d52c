"""Forward + backward time of GlobalContrastiveLoss against the authors' computation, single process.

The baseline transcribes the reference code's steps: one-hot label and self masks built every step,
four similarity matmuls and two concatenations, exp without a shift, `u` on the host (indices moved to
the CPU and the estimates copied back every step), and a Python branch on `u[index].sum()` for first
visits. Prints ms/step (median over --repeats) and the ratio reference / ours.

    python benchmarks/loss.py [--device cpu cuda] [--repeats 5] [--batch-sizes 256 1024 4096] [--threads N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sogclr.losses import GlobalContrastiveLoss

NUM_SAMPLES = 100_000
LARGE_NUM = 1e9


class ReferenceLoss:
    """The reference's dynamic contrastive loss (single-process branch), step by step."""

    def __init__(self, num_samples: int, temperature: float, gamma: float) -> None:
        self.u = torch.zeros(num_samples, 1)  # host memory, as in the reference
        self.temperature = temperature
        self.gamma = gamma

    def __call__(self, z1: Tensor, z2: Tensor, index: Tensor) -> Tensor:
        device = z1.device
        h1, h2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        batch = h1.shape[0]
        labels = F.one_hot(torch.arange(batch), 2 * batch).to(device)
        self_mask = F.one_hot(torch.arange(batch), batch).to(device)
        logits_aa = h1 @ h1.T - self_mask * LARGE_NUM
        logits_bb = h2 @ h2.T - self_mask * LARGE_NUM
        logits1 = torch.cat([h1 @ h2.T, logits_aa], dim=1)
        logits2 = torch.cat([h2 @ h1.T, logits_bb], dim=1)
        neg_mask = 1 - labels
        neg1 = torch.exp(logits1 / self.temperature) * neg_mask
        neg2 = torch.exp(logits2 / self.temperature) * neg_mask
        num_neg = 2 * (batch - 1)
        gamma = 1.0 if self.u[index.cpu()].sum() == 0 else self.gamma
        u1 = (1 - gamma) * self.u[index.cpu()].to(device) + gamma * neg1.sum(1, keepdim=True) / num_neg
        u2 = (1 - gamma) * self.u[index.cpu()].to(device) + gamma * neg2.sum(1, keepdim=True) / num_neg
        self.u[index.cpu()] = (u1.detach().cpu() + u2.detach().cpu()) / 2
        loss1 = self._weighted_cross_entropy(labels, logits1, (neg1 / u1).detach(), num_neg)
        loss2 = self._weighted_cross_entropy(labels, logits2, (neg2 / u2).detach(), num_neg)
        return (loss1 + loss2).mean()

    @staticmethod
    def _weighted_cross_entropy(labels: Tensor, logits: Tensor, weights: Tensor, num_neg: int) -> Tensor:
        normalized = logits - (weights * logits).sum(1, keepdim=True) / num_neg
        return -(labels * normalized).sum(1)


LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def median_step_ms(
    loss_fns: list[LossFn], batch: int, dim: int, device: torch.device, repeats: int
) -> list[float]:
    """Median wall time of forward + backward per step, for each loss; steps alternate between the losses
    so that a busy machine slows them alike. One untimed warm-up step each first."""
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(NUM_SAMPLES, generator=generator)
    z1 = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    z2 = torch.randn(batch, dim, generator=generator).to(device).requires_grad_()
    times: list[list[float]] = [[] for _ in loss_fns]
    for step in range(repeats + 1):
        index = indices[step * batch : (step + 1) * batch].to(device)
        for loss_fn, loss_times in zip(loss_fns, times):
            synchronize(device)
            start = time.perf_counter()
            loss_fn(z1, z2, index).backward()
            synchronize(device)
            loss_times.append(1000 * (time.perf_counter() - start))
    return [statistics.median(loss_times[1:]) for loss_times in times]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_agreement(batch: int, dim: int, device: torch.device) -> float:
    """Largest gradient difference between the two on one first-visit step (a sanity check)."""
    z = torch.randn(2, batch, dim, device=device)
    index = torch.arange(batch, device=device)
    grads = []
    for loss_fn in (ReferenceLoss(NUM_SAMPLES, 0.1, 0.9), GlobalContrastiveLoss(NUM_SAMPLES).to(device)):
        z1, z2 = z[0].clone().requires_grad_(), z[1].clone().requires_grad_()
        loss_fn(z1, z2, index).backward()
        grads.append(torch.cat([z1.grad, z2.grad]))
    return (grads[0] - grads[1]).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    parser.add_argument("--device", nargs="+", default=default_devices, help="devices to measure on")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=128, help="projection dimension")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("$", shlex.join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':<8}{'batch':>7}{'reference ms':>15}{'ours ms':>10}{'ratio':>8}{'max |grad diff|':>17}")
    for device in map(torch.device, args.device):
        for batch in args.batch_sizes:
            reference = ReferenceLoss(NUM_SAMPLES, temperature=0.1, gamma=0.9)
            ours = GlobalContrastiveLoss(NUM_SAMPLES, temperature=0.1, gamma=0.9).to(device)
            ref_ms, our_ms = median_step_ms([reference, ours], batch, args.dim, device, args.repeats)
            diff = check_agreement(batch, args.dim, device)
            ratio = ref_ms / our_ms
            print(f"{device.type:<8}{batch:>7}{ref_ms:>15.2f}{our_ms:>10.2f}{ratio:>8.2f}{diff:>17.1e}")


if __name__ == "__main__":
    main()
