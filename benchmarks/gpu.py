"""Images/s per GPU of our pretraining step, with either augmentation path, and the loss's share of it.

ResNet-50 at 224 px, bf16 autocast, channels_last, our model + GlobalContrastiveLoss + LARS through
`PretrainStep`, the code path of `sogclr.pretrain`, on synthetic batches:

- float views already on the device (`augment_on: loader`: the loader did all the augmentation);
- uint8 crops with their parameters in pinned host memory, as the loader hands them over with
  `augment_on: device`: the step moves them and finishes the augmentation on the GPU. Whether this
  rate holds is whether the GPU keeps up with its own augmentation; `finish_views` is also timed alone.

The loss's share is its forward + backward on the step's real projections, timed alone with CUDA events,
over the full step's time. `--device cpu` runs the same on the CPU (fp32, wall-clock), as a smoke test.

    python benchmarks/gpu.py                       # batch 256 (the reference per-GPU batch is 256/8..256)
    python benchmarks/gpu.py --batch 128 --compile
    python benchmarks/gpu.py --device cpu --arch resnet18 --image-size 32 --batch 8 --steps 2 --warmup 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.data import default_collate

from sogclr.contract.config import PretrainConfig
from sogclr.data.augment import CropBatch, draw_view_params, finish_views
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
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    return parser.parse_args()


def ms_per_call(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Milliseconds per call of `fn` over `repeats` calls: CUDA events on a GPU, wall-clock otherwise."""
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1000 * (time.perf_counter() - start) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def loader_crops(batch: int, image_size: int, pin: bool) -> CropBatch:
    """One view's batch as the loader hands it over with `augment_on: device`: random uint8 crops with
    parameters drawn by the recipe, in pinned memory when there is a GPU to copy to."""
    rng = random.Random(0)
    samples = [
        CropBatch.of(
            torch.randint(0, 256, (3, image_size, image_size), dtype=torch.uint8),
            draw_view_params(rng, 500, 375, image_size, 0.08),
        )
        for _ in range(batch)
    ]
    crops = default_collate(samples)
    return CropBatch(*(t.pin_memory() for t in crops)) if pin else crops


def build_step(cfg: PretrainConfig, device: torch.device, num_samples: int) -> PretrainStep:
    """Our model, loss and LARS inside `PretrainStep`, as `sogclr.pretrain` builds them."""
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_pretrain_model(cfg).to(device, memory_format=memory_format)
    criterion = GlobalContrastiveLoss(num_samples, cfg.temperature, cfg.gamma).to(device)
    optimizer = build_optimizer(
        model,
        "lars",
        scaled_lr(cfg.lr, cfg.batch_size, "sqrt"),
        cfg.weight_decay,
        cfg.momentum,
        cfg.trust_coefficient,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 needs no loss scaling
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    return PretrainStep(wrap_model(model, cfg, env), criterion, optimizer, scaler, cfg, 10_000, 1_000)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA GPU and none is visible (torch.cuda.is_available() is False);"
            " --device cpu runs it on the CPU."
        )
    torch.backends.cudnn.benchmark = True
    cfg = PretrainConfig(
        dataset="digits",
        arch=args.arch,
        image_size=args.image_size,
        batch_size=args.batch,
        compile=args.compile,
    )
    num_samples = 8 * args.batch
    step = build_step(cfg, device, num_samples)
    indices = torch.arange(num_samples, device=device).view(8, args.batch)
    counter = iter(range(10**9))

    def train_step(views: list) -> None:
        i = next(counter)
        step(views, indices[i % 8], global_step=20_000 + i)  # past warmup: a realistic learning rate

    def timed(fn: Callable[[], object]) -> float:
        for _ in range(args.warmup):
            fn()
        return ms_per_call(fn, args.steps, device)

    shape = (args.batch, 3, args.image_size, args.image_size)
    views = [torch.randn(shape, device=device).contiguous(memory_format=step.memory_format) for _ in range(2)]
    crops = [loader_crops(args.batch, args.image_size, pin=device.type == "cuda") for _ in range(2)]
    crops_on_device = [c.to(device) for c in crops]
    step_ms = timed(lambda: train_step(views))
    crops_step_ms = timed(lambda: train_step(crops))
    finish_ms = timed(lambda: [finish_views(c) for c in crops_on_device])

    criterion, autocast = step.criterion, dict(dtype=step.dtype, enabled=step.dtype is not None)
    with torch.no_grad(), torch.autocast(device.type, **autocast):
        projections = [step.model.model(v) for v in views]
    z1, z2 = (z.detach().requires_grad_() for z in projections)

    def loss_forward_backward() -> None:
        with torch.autocast(device.type, **autocast):
            loss = criterion(z1, z2, indices[0])
        loss.backward()

    loss_ms = timed(loss_forward_backward)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    precision = "bf16 channels_last" if device.type == "cuda" else "fp32"
    print(f"{args.arch} {args.image_size}px batch {args.batch} (2 views) {precision} on {name}")
    rate = 1000 * args.batch
    print(f"  {'step, float views on the device':<34} {step_ms:8.2f} ms {rate / step_ms:8.0f} images/s")
    print(
        f"  {'step, augment_on=device crops':<34} {crops_step_ms:8.2f} ms {rate / crops_step_ms:8.0f}"
        f" images/s   x{step_ms / crops_step_ms:.2f} of the above"
    )
    print(
        f"  {'finish_views alone, both views':<34} {finish_ms:8.2f} ms {rate / finish_ms:8.0f} images/s"
        f"   {100 * finish_ms / crops_step_ms:.1f}% of the step"
    )
    print(f"  {'loss f+b':<34} {loss_ms:8.3f} ms   {100 * loss_ms / step_ms:.2f}% of the step")
    if device.type == "cuda":
        print(f"  peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
