"""Overhead of our pretraining step over a minimal hand-written PyTorch loop (target: within 5%).

Ours is the code path of `sogclr.pretrain`: `PretrainStep` (lr and gamma schedules, device placement,
autocast, the `TwoViews` wrapper, grad scaler) plus `PretrainMonitor` (metrics accumulated on the device)
and the step-boundary bookkeeping (`Progress`). The baseline forwards both views, computes the same loss,
backpropagates and steps the same LARS optimizer, nothing else. Both run the same model on the same
synthetic batches, interleaved in rounds so that drifting machine load hits both alike.

    python benchmarks/train_step.py                      # CPU, ResNet-18, 32 px, batch 64
    python benchmarks/train_step.py --arch resnet50 --image-size 224 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sogclr.contract.config import PretrainConfig
from sogclr.losses import GlobalContrastiveLoss
from sogclr.model import build_pretrain_model
from sogclr.optim import build_optimizer
from sogclr.pretrain import PretrainMonitor, PretrainStep, TwoViews
from sogclr.training.loop import Progress
from sogclr.training.metrics import MetricsLogger


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="bf16", help="autocast dtype on GPU (CPU runs fp32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, batches: list, device: torch.device) -> float:
    """Milliseconds per step over `batches`."""
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / len(batches)


def ours(cfg: PretrainConfig, model, device: torch.device, num_samples: int, log_dir: Path):
    criterion = GlobalContrastiveLoss(num_samples, cfg.temperature, cfg.gamma).to(device)
    optimizer = build_optimizer(model, "lars", 0.1, cfg.weight_decay, cfg.momentum, cfg.trust_coefficient)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    progress = Progress(steps_per_epoch=1000)
    step = PretrainStep(TwoViews(model), criterion, optimizer, scaler, cfg, 100_000, progress.steps_per_epoch)
    monitor = PretrainMonitor(MetricsLogger(log_dir / "metrics.jsonl", 100_000), criterion, cfg, step)

    def one_step(batch) -> None:
        views, index = batch
        loss = step(views, index, progress.global_step)
        monitor.after_step(loss, progress)
        progress.advance()

    return one_step


def baseline(cfg: PretrainConfig, model, device: torch.device, num_samples: int):
    criterion = GlobalContrastiveLoss(num_samples, cfg.temperature, cfg.gamma).to(device)
    optimizer = build_optimizer(model, "lars", 0.1, cfg.weight_decay, cfg.momentum, cfg.trust_coefficient)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format

    def one_step(batch) -> None:
        (x1, x2), index = batch
        x1, x2 = (x.to(device, non_blocking=True, memory_format=memory_format) for x in (x1, x2))
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = criterion(model(x1), model(x2), index.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return one_step


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = PretrainConfig(
        dataset="digits",
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch,
        precision=args.precision if device.type == "cuda" else "fp32",
        log_every_steps=args.steps * args.rounds * 10,  # accumulate on the device; never read back here
    )
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    num_samples = args.batch * args.steps
    batches = [
        ([torch.randn(args.batch, 3, args.image_size, args.image_size) for _ in range(2)], index)
        for index in torch.arange(num_samples).view(args.steps, args.batch)
    ]
    if device.type == "cuda":
        batches = [([v.pin_memory() for v in views], index.pin_memory()) for views, index in batches]

    with tempfile.TemporaryDirectory() as log_dir:
        candidates = {
            "ours": ours(cfg, copy.deepcopy(model), device, num_samples, Path(log_dir)),
            "baseline": baseline(cfg, copy.deepcopy(model), device, num_samples),
        }
        for step in candidates.values():  # warm-up: allocator, cudnn autotuning, first-visit u updates
            time_steps(step, batches[:3], device)
        times = {name: [] for name in candidates}
        for _ in range(args.rounds):
            for name, step in candidates.items():
                times[name].append(time_steps(step, batches, device))

    ms = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.arch} {args.image_size}px batch {args.batch} on {device} ({torch.get_num_threads()} threads)"
    )
    for name, value in ms.items():
        spread = f"{min(times[name]):.1f}-{max(times[name]):.1f}"
        print(f"  {name:9s} {value:8.1f} ms/step (median of {args.rounds} rounds; range {spread})")
    print(f"  overhead  {100 * (ms['ours'] / ms['baseline'] - 1):+.1f}%  (ours / baseline - 1, medians)")
    # Adjacent rounds share the machine's load of the moment: their ratio is the less noisy estimate.
    paired = statistics.median(o / b for o, b in zip(times["ours"], times["baseline"], strict=True))
    print(f"  overhead  {100 * (paired - 1):+.1f}%  (median over rounds of ours / baseline - 1)")


if __name__ == "__main__":
    main()
