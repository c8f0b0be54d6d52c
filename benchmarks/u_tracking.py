"""How far SogCLR's estimator u is from the exact value it estimates, over training (issue 22).

u_i is a moving average, over the visits of image i, of the batch estimate of the mean of exp(s / T) over
its negatives, both views pooled (one u per image). Its exact counterpart for the current encoder is
g_i = (g_i1 + g_i2) / 2, g_iv the mean of exp(s / T) over every view of every other image, here on one
fixed pair of views per image (epoch 0's draws, as `objective_every_epochs`). For every checkpoint of a
SogCLR run, this prints, in the objective's units (T x log):

- bias: mean over images of T (log u_i - log g_i). Positive: u overestimates g, so the weights e / u
  push the negatives away more weakly than the global objective asks;
- spread: their standard deviation (augmentation noise of one pair of fixed views included);
- corr: the correlation of log u and log g over images;
- the exact pooled objective, and the same objective with u in place of g (what the run logs).

`--train-mode P` adds g_train: the same mean, but from the train-mode forward that training sees (each
view's batch of `batch_size` images normalised by its own BatchNorm statistics), in-batch, averaged over
P shuffled passes; and u against it.

Keep every epoch's checkpoint when pretraining, then point this at the run directory (or at checkpoint
files):

    python -m sogclr.pretrain --config configs/run/digits.yaml --set run_dir=/tmp/u \\
        --set pretrain.checkpoint.keep=1000 --set pretrain.checkpoint.every_minutes=100000 [--set ...]
    python benchmarks/u_tracking.py /tmp/u [--train-mode 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sogclr.contract.config import RunConfig
from sogclr.contract.dataindex import build_index
from sogclr.data.datasets import build_pretrain_dataset
from sogclr.data.transforms import PretrainAugment
from sogclr.evaluation.diagnostics import FixedViews, anchor_terms, in_memory, project_fixed_views
from sogclr.model import build_pretrain_model
from sogclr.training.checkpoint import load_file

CHECKPOINT = re.compile(r"ckpt-(\d+)\.pt")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's step checkpoints, oldest first."""
    found = [
        (int(m.group(1)), p)
        for p in (run_dir / "checkpoints").iterdir()
        if (m := CHECKPOINT.fullmatch(p.name))
    ]
    return [path for _, path in sorted(found)]


def exact_log_g(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per image: log of the exact pooled mean of exp(s / T) over negatives, and its mean s_pos."""
    terms = anchor_terms(F.normalize(z1, dim=1), F.normalize(z2, dim=1), temperature)
    num_images = z1.shape[0]
    log_g = torch.logaddexp(*terms.log_mean_neg.view(2, num_images)) - math.log(2)
    return log_g, terms.s_pos.view(2, num_images).mean(dim=0)


@torch.no_grad()
def train_mode_log_g(
    model: nn.Module, views: Tensor, batch_size: int, temperature: float, passes: int
) -> Tensor:
    """Per image: log of the in-batch pooled mean of exp(s / T) in train mode, averaged over `passes`
    shuffled passes (a copy of the model: its BatchNorm statistics stay as they were)."""
    model = copy.deepcopy(model).train()
    num_images = views.shape[0]
    total, visits = torch.zeros(num_images), torch.zeros(num_images)
    generator = torch.Generator().manual_seed(0)
    for _ in range(passes):
        order = torch.randperm(num_images, generator=generator)
        for index in order[: num_images // batch_size * batch_size].view(-1, batch_size):
            h1, h2 = (F.normalize(model(views[index, view]), dim=1) for view in (0, 1))
            log_mean_neg = anchor_terms(h1, h2, temperature).log_mean_neg
            total[index] += (torch.logaddexp(*log_mean_neg.view(2, -1)) - math.log(2)).exp()
            visits[index] += 1
    return (total / visits).log()


def compare(log_u: Tensor, log_g: Tensor, s_pos: Tensor, temperature: float) -> dict[str, float]:
    seen = log_u.isfinite()
    error = temperature * (log_u[seen] - log_g[seen])
    correlation = torch.corrcoef(torch.stack([log_u[seen], log_g[seen]]))[0, 1].item()
    return {
        "bias": error.mean().item(),
        "spread": error.std().item(),
        "corr": correlation,
        "exact": (temperature * log_g - s_pos).mean().item(),
        "with u": (temperature * log_u[seen] - s_pos[seen]).mean().item(),
        "seen": seen.float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run directories or checkpoint files")
    parser.add_argument("--train-mode", type=int, default=0, metavar="PASSES")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for path in args.runs:
        report(checkpoints(path) if path.is_dir() else [path], args.train_mode)


def report(paths: list[Path], train_mode_passes: int) -> None:
    """One table row per checkpoint of one run."""
    cfg = RunConfig.model_validate(load_file(paths[0])["config"]).pretrain
    if cfg.loss != "sogclr":
        raise SystemExit(f"{paths[0]}: a {cfg.loss} run has no u")
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    views = FixedViews(dataset, range(len(dataset)), PretrainAugment(cfg.image_size, cfg.crop_min))
    views = in_memory(views, batch_size=256)
    model = build_pretrain_model(cfg)
    print(
        f"{paths[0].parent.parent}: batch {cfg.batch_size}, gamma {cfg.gamma} ({cfg.gamma_schedule}), "
        f"T {cfg.temperature}"
    )
    extra = (
        " T(log g_train - log g) | T(log u - log g_train) | corr(u, g_train) |" if train_mode_passes else ""
    )
    print(
        "| epoch | bias T(log u - log g) | spread | corr | exact pooled objective | with u | seen |" + extra
    )
    print("|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (3 if train_mode_passes else 0))
    for path in paths:
        checkpoint = load_file(path)
        epochs = checkpoint["global_step"] / checkpoint["steps_per_epoch"]
        model.load_state_dict(checkpoint["model"])
        log_g, s_pos = exact_log_g(*project_fixed_views(model.eval(), views, 256), cfg.temperature)
        log_u = checkpoint["criterion"]["log_u"]
        found = compare(log_u, log_g, s_pos, cfg.temperature)
        row = (
            f"| {epochs:g} | {found['bias']:+.4f} | {found['spread']:.4f} | {found['corr']:.3f} "
            f"| {found['exact']:.4f} | {found['with u']:.4f} | {found['seen']:.2f} |"
        )
        if train_mode_passes:
            log_g_train = train_mode_log_g(model, views, cfg.batch_size, cfg.temperature, train_mode_passes)
            train = compare(log_g_train, log_g, s_pos, cfg.temperature)
            u_train = compare(log_u, log_g_train, s_pos, cfg.temperature)
            row += f" {train['bias']:+.4f} | {u_train['bias']:+.4f} | {u_train['corr']:.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
