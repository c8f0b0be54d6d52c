"""The global contrastive objective, computed exactly, and how well mini-batch gradients estimate it.

SogCLR's claim (Yuan et al., ICML 2022) is about the objective over the whole dataset: for each anchor
view a, every view of every other image is a negative (n = 2(N-1) of them), and

    global objective (per anchor)  T log( mean_negatives exp(s_aj / T) ) - s_a,pos

whose in-batch version biases the gradient, more so the smaller the batch, while SogCLR's moving average
`u` makes the mini-batch gradient (asymptotically) unbiased. With the encoder frozen and one fixed pair of
views per image, the dataset is a fixed set of 2N embeddings: the objective and its gradient with respect
to a small trainable head are exact, and any loss's mini-batch gradients can be compared with them.

- `anchor_terms`, `global_objective`, `global_simclr_objective`: the exact objectives of 2N embeddings.
- `FixedViews`, `project_fixed_views`, `GlobalObjective`: the objectives of an encoder over a fixed
  subset of its training set (a pretraining metric; also the input of the study).
- `true_gradient`, `gradient_bias`: the exact gradient with respect to a linear head on the frozen
  projections, and the bias, variance and cosine of a loss's mini-batch gradient estimates of it.
- `shared_u_limit_gradient`: where SogCLR's estimates tend at small gamma with fixed views (one u per
  image serves both of its views, whose exact g differ).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from sogclr.data import IndexedImageFolder, sample_rng
from sogclr.distributed import all_gather_cat

# The fixed views of an image are the ones pretraining draws for it in this epoch.
FIXED_VIEWS_EPOCH = 0

TwoViewAugment = Callable[[Image.Image, random.Random], tuple[Tensor, Tensor]]

# --------------------------------------------------------------------------------------------------------
# Exact objectives of a fixed set of 2N unit-norm embeddings


class AnchorTerms(NamedTuple):
    """Per anchor (the N first views, then the N second views): what every objective is made of."""

    s_pos: Tensor  # [2N] similarity to the positive, the other view of the same image
    log_mean_neg: Tensor  # [2N] log of the mean over its 2(N-1) negatives of exp(s / T)


def anchor_terms(h1: Tensor, h2: Tensor, temperature: float, chunk_rows: int = 4096) -> AnchorTerms:
    """The terms of every anchor of two views `h1, h2` `[N, d]` (unit norm); differentiable.

    Anchors are contrasted with all 2N views in chunks of rows, so memory stays at chunk_rows x 2N.
    """
    num_images = h1.shape[0]
    if num_images < 2:
        raise ValueError("the global objective needs at least 2 images")
    views = torch.cat([h1, h2])
    positive = torch.arange(2 * num_images, device=views.device).roll(num_images)
    s_pos = (views * views[positive]).sum(dim=1)
    log_sums = []
    for start in range(0, 2 * num_images, chunk_rows):
        rows = torch.arange(start, min(start + chunk_rows, 2 * num_images), device=views.device)
        logits = views[rows] @ views.T / temperature
        not_negative = torch.stack([rows, positive[rows]], dim=1)  # the anchor itself and its positive
        log_sums.append(logits.scatter(1, not_negative, -math.inf).logsumexp(dim=1))
    log_mean_neg = torch.cat(log_sums) - math.log(2 * (num_images - 1))
    return AnchorTerms(s_pos, log_mean_neg)


def global_objective(terms: AnchorTerms, temperature: float) -> Tensor:
    """SogCLR's global contrastive objective per anchor, T log mean_neg exp(s / T) - s_pos, `[2N]`."""
    return temperature * terms.log_mean_neg - terms.s_pos


def global_simclr_objective(terms: AnchorTerms, temperature: float) -> Tensor:
    """NT-Xent over the whole dataset per anchor: cross-entropy over s / T, positive in the denominator."""
    num_negatives = 2 * (terms.s_pos.shape[0] // 2 - 1)
    logit_pos = terms.s_pos / temperature
    return torch.logaddexp(logit_pos, terms.log_mean_neg + math.log(num_negatives)) - logit_pos


# --------------------------------------------------------------------------------------------------------
# An encoder's embeddings of fixed views


class FixedViews(Dataset):
    """Two views of each image in `indices`, by `augment` (the pretraining augmentation) with the draws
    of epoch `FIXED_VIEWS_EPOCH`: the same pixels at every read, each item `[2, C, H, W]`. Reads the files
    of `dataset` without changing its state (its epoch is the training loader's)."""

    def __init__(self, dataset: IndexedImageFolder, indices: Sequence[int], augment: TwoViewAugment) -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> Tensor:
        index = self.indices[position]
        image = self.dataset.loader(self.dataset.samples[index][0])
        return torch.stack(self.augment(image, sample_rng(self.dataset.seed, FIXED_VIEWS_EPOCH, index)))


def evenly_spaced(size: int, count: int) -> list[int]:
    """`count` distinct indices spread evenly over range(size) (all of it if count >= size): no RNG, and
    an ImageFolder's classes, stored in order, are all represented in proportion."""
    count = min(count, size)
    return [k * size // count for k in range(count)]


@torch.no_grad()
def project_fixed_views(
    model: nn.Module,
    views: FixedViews,
    batch_size: int,
    workers: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The model's projections (float32) of the first and of the second views, `[M, d]` each.

    Call it with the model in eval mode. Under torch.distributed every rank projects an equal share and
    all ranks receive everything (a collective: every rank must call it).
    """
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = math.ceil(len(views) / world_size)
    # Equal shares for the gather: the last rank repeats the last image to fill its share.
    positions = torch.arange(rank * share, (rank + 1) * share).clamp(max=len(views) - 1).tolist()
    device = next(model.parameters()).device
    # A private generator: the loader must not draw its worker seed from the global RNG.
    loader = DataLoader(
        Subset(views, positions), batch_size, num_workers=workers, generator=torch.Generator()
    )
    projections = []
    for pairs in loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = model(pairs.flatten(0, 1).to(device, non_blocking=True)).float()
        projections.append(z.view(pairs.shape[0], 2, -1))
    both = all_gather_cat(torch.cat(projections))[: len(views)]
    return both[:, 0], both[:, 1]


class GlobalObjective:
    """The exact global objectives of an encoder over a fixed subset of `dataset` (fixed views too).

    `global_objective` is SogCLR's, per anchor: the units of a sogclr run's logged `objective`
    (T log u - s_pos with u replaced by the exact mean over the subset). `global_simclr_objective` is
    NT-Xent over the subset, two views summed: the units of a simclr run's `objective`.
    """

    def __init__(
        self,
        dataset: IndexedImageFolder,
        augment: TwoViewAugment,
        subset_size: int,
        temperature: float,
        batch_size: int,
        workers: int = 0,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.views = FixedViews(dataset, evenly_spaced(len(dataset), subset_size), augment)
        self.temperature = temperature
        self.batch_size = batch_size
        self.workers = workers
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Both objectives of `model` (in eval mode) on the subset."""
        z1, z2 = project_fixed_views(model, self.views, self.batch_size, self.workers, self.dtype)
        terms = anchor_terms(F.normalize(z1, dim=1), F.normalize(z2, dim=1), self.temperature)
        return {
            "global_objective": global_objective(terms, self.temperature).mean().item(),
            "global_simclr_objective": 2 * global_simclr_objective(terms, self.temperature).mean().item(),
        }


# --------------------------------------------------------------------------------------------------------
# Bias and variance of mini-batch gradient estimates

Objective = Callable[[AnchorTerms, float], Tensor]


def identity_head(dim: int) -> nn.Linear:
    """The trainable head of the study: a linear map of the frozen projections, starting as the identity,
    so that its objective is the encoder's own and its gradient is that of a general linear change."""
    head = nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(dim))
    return head


def _exact_head_gradient(
    z1: Tensor, z2: Tensor, temperature: float, per_anchor: Callable[[AnchorTerms], Tensor]
) -> Tensor:
    """The gradient (float64, flattened) with respect to the identity head of the mean over images of the
    sum over both views of `per_anchor` (2x its mean per anchor: our losses sum the two views)."""
    head = identity_head(z1.shape[1]).double()
    h1, h2 = (F.normalize(head(z.double()), dim=1) for z in (z1, z2))
    loss = 2 * per_anchor(anchor_terms(h1, h2, temperature)).mean()
    return torch.autograd.grad(loss, head.weight)[0].flatten()


def true_gradient(z1: Tensor, z2: Tensor, objective: Objective, temperature: float) -> Tensor:
    """The exact gradient of `objective` over all of the projections `z1, z2` `[N, d]`, head at identity."""
    return _exact_head_gradient(z1, z2, temperature, lambda terms: objective(terms, temperature))


def shared_log_u(terms: AnchorTerms) -> Tensor:
    """Per anchor `[2N]`, log of what SogCLR's u tends to at small gamma for a fixed encoder and fixed views:
    one value per image, the mean of its two views' exact mean exp(s / T), used for both of its anchors."""
    num_images = terms.log_mean_neg.shape[0] // 2
    per_image = torch.logaddexp(*terms.log_mean_neg.view(2, num_images)) - math.log(2)
    return per_image.repeat(2)


def shared_u_limit_gradient(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """The mean mini-batch gradient of `GlobalContrastiveLoss` whose u has settled at `shared_log_u`
    (gamma -> 0), exactly: over uniformly drawn batches the weights e_aj / u_a average to all negatives',
    so the mean gradient is that of T g_a / u_a - s_pos with u held fixed (g_a: the exact mean exp(s / T)).
    It equals the true gradient only where each anchor's u is its own g."""

    def surrogate(terms: AnchorTerms) -> Tensor:
        log_u = shared_log_u(terms).detach()
        return temperature * (terms.log_mean_neg - log_u).exp() - terms.s_pos

    return _exact_head_gradient(z1, z2, temperature, surrogate)


def shuffled_batches(
    num_images: int, batch_size: int, passes: int, generator: torch.Generator
) -> Iterator[Tensor]:
    """Dataset indices of the batches of `passes` shuffled passes, the last partial batch of each dropped
    (as our training sampler does)."""
    steps = num_images // batch_size
    for _ in range(passes):
        order = torch.randperm(num_images, generator=generator)
        yield from order[: steps * batch_size].view(steps, batch_size)


def batch_gradients(
    head: nn.Linear, z1: Tensor, z2: Tensor, criterion: nn.Module, batches: Iterable[Tensor]
) -> Iterator[Tensor]:
    """`criterion`'s gradient estimate with respect to the head on each batch, flattened (float64)."""
    for index in batches:
        loss = criterion(head(z1[index]), head(z2[index]), index)
        yield torch.autograd.grad(loss, head.weight)[0].flatten().double()


@torch.no_grad()
def warm_up(head: nn.Linear, z1: Tensor, z2: Tensor, criterion: nn.Module, batches: Iterable[Tensor]) -> None:
    """Forward passes only, so that a loss with state (SogCLR's `u`) settles at this fixed encoder."""
    for index in batches:
        criterion(head(z1[index]), head(z2[index]), index)


@dataclass(frozen=True)
class EstimateStats:
    """How a stream of gradient estimates relates to the true gradient; all relative to its norm."""

    bias: float  # |mean estimate - truth| / |truth|
    variance: float  # mean |estimate - mean estimate|^2 / |truth|^2
    cosine: float  # cosine of the angle between the mean estimate and the truth
    noise: float  # sqrt(variance / estimates): what `bias` reads from sampling alone, for independent draws
    estimates: int


def estimate_stats(estimates: Iterable[Tensor], truth: Tensor) -> EstimateStats:
    """Compare a stream of flattened estimates with `truth`, keeping only running sums (float64)."""
    truth = truth.double()
    total, total_square, count = torch.zeros_like(truth), 0.0, 0
    for estimate in estimates:
        total += estimate
        total_square += estimate.square().sum().item()
        count += 1
    if count == 0:
        raise ValueError("no estimates: the batch size is larger than the dataset")
    mean, scale = total / count, truth.square().sum().item()
    variance = max(total_square / count - mean.square().sum().item(), 0.0) / scale
    return EstimateStats(
        bias=((mean - truth).norm() / truth.norm()).item(),
        variance=variance,
        cosine=F.cosine_similarity(mean, truth, dim=0).item(),
        noise=math.sqrt(variance / count),
        estimates=count,
    )


def gradient_bias(
    z1: Tensor,
    z2: Tensor,
    criterion: nn.Module,
    truth: Tensor,
    batch_size: int,
    passes: int,
    warmup_passes: int = 0,
    seed: int = 0,
) -> EstimateStats:
    """How `criterion`'s mini-batch gradients estimate `truth` (a `true_gradient` of `z1, z2`).

    `z1, z2` `[N, d]` are the frozen projections of the two fixed views; gradients are taken with respect
    to an identity linear head on them. After `warmup_passes` forward-only passes (for SogCLR's `u`),
    `passes` shuffled passes of batches of `batch_size` give one estimate per batch.
    """
    head = identity_head(z1.shape[1])
    num_images = z1.shape[0]
    # The warm-up draws its own batches: every criterion is measured on the same ones, warmed up or not.
    warmup_batches = shuffled_batches(
        num_images, batch_size, warmup_passes, torch.Generator().manual_seed(seed + 1)
    )
    warm_up(head, z1, z2, criterion, warmup_batches)
    batches = shuffled_batches(num_images, batch_size, passes, torch.Generator().manual_seed(seed))
    return estimate_stats(batch_gradients(head, z1, z2, criterion, batches), truth)
