"""ResNet width: training-step throughput of narrower ResNets against torchvision's width 64, on a CPU.

`pretrain.width` sets the channels of the first stage (the later ones double it). A forward and backward
pass of both views' batch through backbone + projector (512 -> 128), one thread, 16 px digits-sized
inputs; the baseline is width 64 in the same run. Views per CPU-second (process time, not wall time: the
machine is shared, and a busy machine stretches wall time but not the CPU time a step takes).

    python benchmarks/width.py [--widths 64 32 16 8] [--views 32 512] [--size 16] [--seconds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from sogclr.model import ContrastiveModel, build_backbone, build_projector, num_params


def views_per_cpu_second(width: int, views: int, size: int, seconds: float) -> float:
    backbone, feature_dim = build_backbone("resnet18", width=width)
    model = ContrastiveModel(backbone, build_projector(feature_dim, 512, 128))
    batch = torch.randn(views, 3, size, size)
    model(batch).sum().backward()  # warm-up: allocations, kernel choice
    start, steps = time.process_time(), 0
    while time.process_time() - start < seconds:
        model.zero_grad()
        model(batch).sum().backward()
        steps += 1
    return views * steps / (time.process_time() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 32, 16, 8])
    parser.add_argument("--views", type=int, nargs="+", default=[32, 512])
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"ResNet-18 + projector, {args.size} px, {args.threads} thread(s); "
        f"views per CPU-second (x width {args.widths[0]})"
    )
    print("| width | parameters | " + " | ".join(f"{v} views/step" for v in args.views) + " |")
    print("|---:|---:|" + "---:|" * len(args.views))
    baseline = {}
    for width in args.widths:
        parameters = num_params(build_backbone("resnet18", width=width)[0])
        cells = []
        for views in args.views:
            rate = views_per_cpu_second(width, views, args.size, args.seconds)
            baseline.setdefault(views, rate)
            cells.append(f"{rate:.0f} (x{rate / baseline[views]:.1f})")
        print(f"| {width} | {parameters / 1e6:.2f} M | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
