"""Bias of mini-batch gradient estimates of the global contrastive objective, against batch size.

SogCLR's claim: the in-batch estimate of the global objective's gradient is biased, more so the smaller the
batch, and the moving average u removes most of that bias. Measured here on our own losses, exactly: a
frozen encoder and one fixed pair of views per training digit make a fixed set of 2 x 1,437 embeddings, so
the global objective (every view of every other image a negative, T of the run config) and its gradient
with respect to a linear head on the embeddings (identity at the start) are exact. Per batch size:

- in-batch (DCL): `GlobalContrastiveLoss` with gamma = 1, against the per-anchor global objective;
- SogCLR: `GlobalContrastiveLoss` at each gamma, u warmed up by forward passes at this state first, against
  the per-anchor objective and against the pooled-views one, T log((g_1 + g_2) / 2) - s_pos per image,
  which is what its one u per image (the mean of both views') estimates as gamma -> 0;
- SimCLR: `SimCLRLoss`, against SimCLR's own global objective (NT-Xent, positive in the denominator).

Bias |mean estimate - gradient| / |gradient| is measured through control variates
(sogclr.evaluation.diagnostics), so a few passes suffice; ± is its standard error. Every estimator sees the
same batches. Two encoders: randomly initialised, and pretrained with the run config (SogCLR on digits, 8
epochs, about a minute),
logging the global objectives at every epoch end (`objective_every_epochs`).

    python benchmarks/gradient_bias.py [--epochs 8] [--batch-sizes 8 16 32 64 128 256 512 1024]
        [--gammas 0.1 0.5 0.9] [--passes 12] [--min-estimates 20] [--warmup-passes 20]
        [--figure benchmarks/figures/gradient_bias.png] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sogclr.contract.config import PretrainConfig, load_run_config
from sogclr.contract.dataindex import build_index
from sogclr.data.datasets import build_pretrain_dataset
from sogclr.data.transforms import PretrainAugment
from sogclr.evaluation.diagnostics import (
    EstimateStats,
    FixedViews,
    anchor_terms,
    exact_reference,
    global_objective,
    global_objective_pooled_views,
    global_simclr_objective,
    gradient_bias,
    project_fixed_views,
)
from sogclr.losses import GlobalContrastiveLoss, SimCLRLoss
from sogclr.model import build_pretrain_model
from sogclr.pretrain import train
from sogclr.training.checkpoint import load_file, seed_everything

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "run" / "digits.yaml"
OBJECTIVES = {
    "per anchor": global_objective,
    "pooled views": global_objective_pooled_views,
    "NT-Xent": global_simclr_objective,
}
SIMCLR = "SimCLR"


@dataclass(frozen=True)
class Estimator:
    name: str
    make: Callable[[], nn.Module]
    objectives: tuple[str, ...]  # the global objectives (keys of OBJECTIVES) it is compared with
    warmup_passes: int = 0

    def columns(self) -> list[str]:
        """One table column per objective: the estimator's name, then the objective after the first."""
        return [self.name] + [f"{self.name} / {objective}" for objective in self.objectives[1:]]


def estimators(
    num_images: int, temperature: float, gammas: list[float], warmup_passes: int
) -> list[Estimator]:
    """In-batch (DCL) and SogCLR against the per-anchor objective (SogCLR also against the pooled-views one,
    its small-gamma target with fixed views), SimCLR against its own."""
    sogclr = [
        Estimator(f"SogCLR {gamma:g}", lambda g=gamma: GlobalContrastiveLoss(num_images, temperature, g),
                  ("per anchor", "pooled views"), warmup_passes)
        for gamma in gammas
    ]  # fmt: skip
    in_batch = Estimator(
        "in-batch (DCL)", lambda: GlobalContrastiveLoss(num_images, temperature, 1.0), ("per anchor",)
    )
    return [in_batch, Estimator(SIMCLR, lambda: SimCLRLoss(temperature), ("NT-Xent",)), *sogclr]


def encoder_projections(model: nn.Module, cfg: PretrainConfig) -> tuple[Tensor, Tensor]:
    """Both fixed views of every training image through `model` in eval mode."""
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    views = FixedViews(dataset, range(len(dataset)), PretrainAugment(cfg.image_size, cfg.crop_min))
    return project_fixed_views(model.eval(), views, batch_size=256)


def pretrained_encoder(cfg_path: Path, epochs: int, run_dir: Path) -> tuple[nn.Module, PretrainConfig, list]:
    """Pretrain with the run config for `epochs`, logging the global objective each epoch."""
    overrides = [
        f"run_dir={run_dir}",
        f"pretrain.epochs={epochs}",
        "pretrain.objective_every_epochs=1",
        "pretrain.log_every_steps=1000000",  # only the epoch-end records
    ]
    cfg = load_run_config(cfg_path, overrides)
    train(cfg)
    model = build_pretrain_model(cfg.pretrain)
    model.load_state_dict(load_file(run_dir / "checkpoints" / "final.pt")["model"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return model, cfg.pretrain, [r for r in records if "global_objective" in r]


@dataclass
class Measurement:
    """All estimators at all batch sizes on one encoder's projections, the encoder's similarities and
    objectives, and the gap between the two SogCLR objectives' gradients (SogCLR's small-gamma limit
    against the per-anchor objective)."""

    stats: dict[tuple[str, int], EstimateStats]
    summary: str
    limit_bias: float
    limit_cosine: float


def describe(z1: Tensor, z2: Tensor, temperature: float) -> str:
    """Mean positive and negative cosine similarity, and the two global objectives (per anchor)."""
    h1, h2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    terms = anchor_terms(h1, h2, temperature)
    views = torch.cat([h1, h2])
    rows = views.shape[0]
    # All pairs, less the anchors themselves and both orders of every positive pair.
    negative_mean = (views.sum(dim=0).square().sum() - rows - terms.s_pos.sum()) / (rows * (rows - 2))
    per_anchor = global_objective(terms, temperature).mean()
    pooled = global_objective_pooled_views(terms, temperature).mean()
    return (
        f"cosine: positives {terms.s_pos.mean():.3f}, negatives {negative_mean:.3f}; global objective "
        f"per anchor {per_anchor:.4f}, pooled views {pooled:.4f}"
    )


def measure(z1: Tensor, z2: Tensor, temperature: float, args: argparse.Namespace) -> Measurement:
    references = {
        name: exact_reference(z1, z2, objective, temperature) for name, objective in OBJECTIVES.items()
    }
    stats = {}
    num_images = z1.shape[0]
    for batch_size in args.batch_sizes:
        # Enough passes for a fair number of estimates at large batches, where a pass is one batch.
        passes = max(args.passes, math.ceil(args.min_estimates / (num_images // batch_size)))
        for estimator in estimators(num_images, temperature, args.gammas, args.warmup_passes):
            references_of = [references[name] for name in estimator.objectives]
            measured = gradient_bias(
                z1, z2, estimator.make(), references_of, temperature, batch_size, passes,
                estimator.warmup_passes, args.seed,
            )  # fmt: skip
            stats.update({(column, batch_size): s for column, s in zip(estimator.columns(), measured)})
    truth, limit = references["per anchor"].gradient, references["pooled views"].gradient
    limit_bias = ((limit - truth).norm() / truth.norm()).item()
    limit_cosine = F.cosine_similarity(limit, truth, dim=0).item()
    return Measurement(stats, describe(z1, z2, temperature), limit_bias, limit_cosine)


def columns(args: argparse.Namespace) -> list[str]:
    return [column for estimator in estimators(2, 1.0, args.gammas, 0) for column in estimator.columns()]


def print_table(measurement: Measurement, names: list[str], batch_sizes: list[int], cell) -> None:
    print("| batch | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for batch_size in batch_sizes:
        print(
            f"| {batch_size} | "
            + " | ".join(cell(measurement.stats[name, batch_size]) for name in names)
            + " |"
        )
    print()


def print_tables(title: str, measurement: Measurement, args: argparse.Namespace) -> None:
    print(f"\n### {title}\n\n{measurement.summary}\n")
    print(
        f"SogCLR's small-gamma limit (the pooled-views objective's gradient) against the per-anchor "
        f"objective's: bias {measurement.limit_bias:.4f}, cosine {measurement.limit_cosine:.4f}\n"
    )
    names = columns(args)
    print("bias ± its standard error:\n")
    print_table(measurement, names, args.batch_sizes, lambda s: f"{s.bias:.4f} ±{s.noise:.4f}")
    print("variance (of single-batch estimates; SogCLR's is the same against either objective):\n")
    print_table(
        measurement, [n for n in names if "/" not in n], args.batch_sizes, lambda s: f"{s.variance:.4f}"
    )
    print("cosine between mean estimate and gradient:\n")
    print_table(measurement, names, args.batch_sizes, lambda s: f"{s.cosine:.4f}")


def plot(panels: dict[str, Measurement], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), sharey=True)
    for ax, (title, measurement) in zip(axes, panels.items()):
        for color, estimator in enumerate(estimators(2, 1.0, args.gammas, 0)):
            for column, style in zip(estimator.columns(), ("-", ":")):
                bias = [measurement.stats[column, b].bias for b in args.batch_sizes]
                ax.plot(
                    args.batch_sizes,
                    bias,
                    f"C{color}",
                    linestyle=style,
                    marker="o",
                    markersize=3,
                    label=column,
                )
        ax.axhline(measurement.limit_bias, color="grey", linewidth=0.8, label="pooled vs per-anchor gradient")
        noise = [
            max(s.noise for (_, b), s in measurement.stats.items() if b == size) for size in args.batch_sizes
        ]
        ax.plot(args.batch_sizes, noise, color="black", linewidth=0.6, label="standard error (largest)")
        ax.set(xscale="log", yscale="log", title=title, xlabel="batch size")
        ax.set_xticks(args.batch_sizes, [str(b) for b in args.batch_sizes])
    axes[0].set_ylabel("bias  |mean estimate - gradient| / |gradient|")
    axes[-1].legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.figure, dpi=110)
    print(f"figure: {args.figure}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="run config (digits recipe)")
    parser.add_argument("--epochs", type=int, default=None, help="pretraining epochs (default: the config's)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--passes", type=int, default=12, help="shuffled passes measured per batch size")
    parser.add_argument("--min-estimates", type=int, default=20, help="more passes until this many batches")
    parser.add_argument(
        "--warmup-passes", type=int, default=20, help="forward-only passes to warm SogCLR's u"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=Path("benchmarks/figures/gradient_bias.png"))
    # One thread: the steps are small, and on a shared machine two threads wait for each other.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print("$", shlex.join(["python", *sys.argv]))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    start = time.perf_counter()
    base = load_run_config(args.config, ["run_dir=unused"]).pretrain
    args.epochs = args.epochs or base.epochs
    seed_everything(base.seed)
    encoders = {"random init": encoder_projections(build_pretrain_model(base), base)}
    with tempfile.TemporaryDirectory() as run_dir:
        model, cfg, records = pretrained_encoder(args.config, args.epochs, Path(run_dir))
    encoders[f"pretrained {args.epochs} epochs"] = encoder_projections(model, cfg)
    for name in ("global_objective", "global_objective_pooled_views", "global_simclr_objective"):
        print(
            f"{name} after each pretraining epoch (metrics.jsonl): "
            + ", ".join(f"{r[name]:.4f}" for r in records)
        )
    print(f"encoders ready after {time.perf_counter() - start:.0f} s")
    print(f"T = {base.temperature}; {encoders['random init'][0].shape[0]} images, 2 fixed views each")

    panels = {}
    for title, (z1, z2) in encoders.items():
        panels[title] = measure(z1, z2, base.temperature, args)
        print_tables(title, panels[title], args)
        print(f"measured after {time.perf_counter() - start:.0f} s")
    plot(panels, args)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
