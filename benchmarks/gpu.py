"""Images/s per GPU of our pretraining step, and the loss's share of the step time.

ResNet-50 at 224 px, bf16 autocast, channels_last, synthetic batches already on the device (so the data
pipeline is not measured), our model + GlobalContrastiveLoss + LARS through `PretrainStep`, the code path
of `sogclr.pretrain`. The loss's share is its forward + backward on the step's real projections, timed
alone with CUDA events, over the full step's time.

    python benchmarks/gpu.py                       # batch 256 (the reference per-GPU batch is 256/8..256)
    python benchmarks/gpu.py --batch 128 --compile
"""

from __future__ import annotations

import argparse
import sys

import torch

from sogclr.config import PretrainConfig
from sogclr.distributed import DistEnv
from sogclr.losses import GlobalContrastiveLoss
from sogclr.model import build_pretrain_model
from sogclr.optim import build_optimizer, scaled_lr
from sogclr.pretrain import PretrainStep, wrap_model


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=256, help="images per step on this GPU")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    return parser.parse_args()


def cuda_ms(fn, repeats: int) -> float:
    """Milliseconds per call of `fn`, measured with CUDA events around `repeats` calls."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)."
        )
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    cfg = PretrainConfig(
        dataset="digits",
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch,
        compile=args.compile,
    )
    model = build_pretrain_model(cfg).to(device, memory_format=torch.channels_last)
    num_samples = 8 * args.batch
    criterion = GlobalContrastiveLoss(num_samples, cfg.temperature, cfg.gamma).to(device)
    optimizer = build_optimizer(
        model,
        "lars",
        scaled_lr(cfg.lr, args.batch, "sqrt"),
        cfg.weight_decay,
        cfg.momentum,
        cfg.trust_coefficient,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # bf16 needs no loss scaling
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    step = PretrainStep(wrap_model(model, cfg, env), criterion, optimizer, scaler, cfg, 10_000, 1_000)

    shape = (args.batch, 3, args.image_size, args.image_size)
    views = [
        torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last) for _ in range(2)
    ]
    indices = torch.arange(num_samples, device=device).view(8, args.batch)
    counter = iter(range(10**9))

    def train_step() -> None:
        i = next(counter)
        step(views, indices[i % 8], global_step=20_000 + i)  # past warmup: a realistic learning rate

    for _ in range(args.warmup):
        train_step()
    step_ms = cuda_ms(train_step, args.steps)

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        projections = [model(v) for v in views]
    z1, z2 = (z.detach().requires_grad_() for z in projections)

    def loss_forward_backward() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = criterion(z1, z2, indices[0])
        loss.backward()

    for _ in range(args.warmup):
        loss_forward_backward()
    loss_ms = cuda_ms(loss_forward_backward, args.steps)

    name = torch.cuda.get_device_name(device)
    print(f"{args.arch} {args.image_size}px batch {args.batch} (2 views) bf16 channels_last on {name}")
    print(f"  step       {step_ms:8.2f} ms   {1000 * args.batch / step_ms:8.0f} images/s per GPU")
    print(f"  loss f+b   {loss_ms:8.3f} ms   {100 * loss_ms / step_ms:6.2f}% of the step")
    print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
