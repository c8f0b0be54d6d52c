"""The global contrastive objective, computed exactly, and how well mini-batch gradients estimate it.

SogCLR's claim (Yuan et al., ICML 2022) is about the objective over the whole dataset: for each anchor
view a, every view of every other image is a negative (n = 2(N-1) of them), and

    global objective (per anchor)  T log( mean_negatives exp(s_aj / T) ) - s_a,pos

whose in-batch version biases the gradient, more so the smaller the batch, while SogCLR's moving average
`u` makes the mini-batch gradient (asymptotically) unbiased. With the encoder frozen and one fixed pair of
views per image, the dataset is a fixed set of 2N embeddings: the objective and its gradient with respect
to a small trainable head are exact, and any loss's mini-batch gradients can be compared with them.

- `anchor_terms`, `global_objective`, `global_objective_pooled_views`, `global_simclr_objective`: exact
  objectives of 2N embeddings.
- `FixedViews`, `project_fixed_views`, `GlobalObjective`: the objectives of an encoder over a fixed
  subset of its training set (a pretraining metric; also the input of the study).
- `exact_reference`, `gradient_bias`: the exact gradient with respect to a linear head on the frozen
  projections, and the bias, variance and cosine of a loss's mini-batch gradient estimates of it.
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

from sogclr.data.datasets import IndexedImageFolder, sample_rng
from sogclr.distributed import all_gather_cat
from sogclr.training.watchdog import progressed

# The fixed views of an image are the ones pretraining draws for it in this epoch.
FIXED_VIEWS_EPOCH = 0
# Fixed views that fit in this many bytes are augmented once and kept in memory: on the digits the
# augmentation took 7 of an evaluation's 9 CPU-seconds (ImageNet's 10,000 views at 224 px are 12 GB: read
# again each time).
VIEWS_IN_MEMORY_BYTES = 256 * 2**20

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


def global_objective_pooled_views(terms: AnchorTerms, temperature: float) -> Tensor:
    """The same with each image's two views pooled inside the log, per anchor: T log((g_1 + g_2) / 2) - s_pos,
    g_v the mean exp(s / T) over the negatives of view v (every image's anchors share one value).

    This is what `GlobalContrastiveLoss` estimates without bias as gamma -> 0: it keeps one u per image,
    the mean of its two views' estimates (NOTES-sogclr.md step 4, as the reference code), and weights both
    anchors with it. In training, where views are drawn afresh every epoch, u pools the anchor's
    augmentations in the same way. With fixed views it differs from `global_objective`, whose terms are
    the anchor's own.
    """
    num_images = terms.log_mean_neg.shape[0] // 2
    pooled = torch.logaddexp(*terms.log_mean_neg.view(2, num_images)) - math.log(2)
    return temperature * pooled.repeat(2) - terms.s_pos


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
        image = self.dataset.open(index)
        return torch.stack(self.augment(image, sample_rng(self.dataset.seed, FIXED_VIEWS_EPOCH, index)))


def evenly_spaced(size: int, count: int) -> list[int]:
    """`count` distinct indices spread evenly over range(size) (all of it if count >= size): no RNG, and
    an ImageFolder's classes, stored in order, are all represented in proportion."""
    count = min(count, size)
    return [k * size // count for k in range(count)]


@torch.no_grad()
def project_fixed_views(
    model: nn.Module,
    views: Dataset,
    batch_size: int,
    workers: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The model's projections (float32) of the first and of the second views, `[M, d]` each; `views`
    is a `FixedViews` or what `in_memory` made of one.

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
        progressed()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            z = model(pairs.flatten(0, 1).to(device, non_blocking=True)).float()
        projections.append(z.view(pairs.shape[0], 2, -1))
    both = all_gather_cat(torch.cat(projections))[: len(views)]
    return both[:, 0], both[:, 1]


def in_memory(
    views: FixedViews, batch_size: int, workers: int = 0, max_bytes: int = VIEWS_IN_MEMORY_BYTES
) -> Dataset:
    """`views` as one tensor `[M, 2, C, H, W]` (a dataset of the same items) if it fits in `max_bytes`,
    else `views` itself. Every rank keeps all of them (augmented once, here)."""
    first = views[0]  # one more augmentation, to size them
    if len(views) * first.nelement() * first.element_size() > max_bytes:
        return views
    batches = []
    for batch in DataLoader(views, batch_size, num_workers=workers, generator=torch.Generator()):
        progressed()
        batches.append(batch)
    return torch.cat(batches)


class GlobalObjective:
    """The exact global objectives of an encoder over a fixed subset of `dataset` (fixed views too).

    In the units of a sogclr run's logged `objective` (T log u - s_pos, mean per anchor):
    `global_objective`, SogCLR's with each anchor's own negatives, and `global_objective_pooled_views`,
    with each image's two views pooled inside the log, the exact counterpart of that logged value (u is one
    number per image). `global_simclr_objective`: NT-Xent over the subset, the two views summed, in the
    units of a simclr run's `objective`.
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
        self.views: Dataset = FixedViews(dataset, evenly_spaced(len(dataset), subset_size), augment)
        self.views_in_memory = False  # made so at the first evaluation, where they fit
        self.temperature = temperature
        self.batch_size = batch_size
        self.workers = workers
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        """Both objectives of `model` (in eval mode) on the subset."""
        if not self.views_in_memory:
            self.views, self.views_in_memory = in_memory(self.views, self.batch_size, self.workers), True
        z1, z2 = project_fixed_views(model, self.views, self.batch_size, self.workers, self.dtype)
        terms = anchor_terms(F.normalize(z1, dim=1), F.normalize(z2, dim=1), self.temperature)
        return {
            "global_objective": global_objective(terms, self.temperature).mean().item(),
            "global_objective_pooled_views": global_objective_pooled_views(terms, self.temperature)
            .mean()
            .item(),
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


def head_terms(head: nn.Linear, z1: Tensor, z2: Tensor, temperature: float) -> AnchorTerms:
    """The anchor terms of the projections `z1, z2` `[N, d]` through `head`, differentiable in its weight."""
    return anchor_terms(F.normalize(head(z1), dim=1), F.normalize(head(z2), dim=1), temperature)


def _weight_gradient(loss: Tensor, head: nn.Linear, retain_graph: bool = False) -> Tensor:
    return torch.autograd.grad(loss, head.weight, retain_graph=retain_graph)[0].flatten().double()


@dataclass(frozen=True)
class ExactReference:
    """An objective's exact gradient over all 2N fixed projections, with respect to an identity head on
    them, scaled as our losses are (mean over images of the sum over both views: 2x the mean per anchor);
    and its derivatives in each anchor's two terms, from which `control` builds control variates."""

    gradient: Tensor  # [d * d] float64
    log_mean_neg: Tensor  # [2N] the exact terms
    d_s_pos: Tensor  # [2N] derivative of the scaled objective in each anchor's s_pos
    d_log_mean_neg: Tensor  # [2N] ... and in its log_mean_neg

    def control(self, batch_terms: AnchorTerms, index: Tensor, head: nn.Linear) -> Tensor:
        """An unbiased estimate of `gradient` from the batch `index` alone: `batch_terms` are the batch's
        anchor terms through `head` (`head_terms`), whose graph is kept for other references' controls.

        The objective linearised in each anchor's terms, with exp(batch log-mean - exact log-mean) for the
        log-mean: its mean over uniformly drawn batches is 1 at every head, so its gradient's mean is the
        exact log-mean's. Subtracted from a loss's estimate on the same batch, it cancels most of their
        shared sampling noise, so that the bias is measured from far fewer batches.
        """
        num_images = self.log_mean_neg.shape[0] // 2
        anchors = torch.cat([index, index + num_images])
        ratio = (batch_terms.log_mean_neg - self.log_mean_neg[anchors]).exp()
        linearised = self.d_s_pos[anchors] * batch_terms.s_pos + self.d_log_mean_neg[anchors] * ratio
        # Each anchor is in a batch with probability b / N.
        return _weight_gradient(linearised.sum() * num_images / index.shape[0], head, retain_graph=True)


def exact_reference(z1: Tensor, z2: Tensor, objective: Objective, temperature: float) -> ExactReference:
    """The exact gradient of `objective` over all of the projections `z1, z2` `[N, d]` (float64)."""
    head = identity_head(z1.shape[1]).double()
    terms = head_terms(head, z1.double(), z2.double(), temperature)
    s_pos, log_mean_neg = (term.detach().requires_grad_() for term in terms)
    scaled = 2 * objective(AnchorTerms(s_pos, log_mean_neg), temperature).mean()
    d_s_pos, d_log_mean_neg = torch.autograd.grad(scaled, (s_pos, log_mean_neg))
    # The chain rule through the terms: the same gradient as differentiating the objective directly.
    gradient = _weight_gradient((d_s_pos * terms.s_pos + d_log_mean_neg * terms.log_mean_neg).sum(), head)
    return ExactReference(gradient, log_mean_neg.detach(), d_s_pos, d_log_mean_neg)


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
    criterion: nn.Module,
    references: Sequence[ExactReference],
    z1: Tensor,
    z2: Tensor,
    temperature: float,
    batches: Iterable[Tensor],
) -> Iterator[tuple[Tensor, list[Tensor]]]:
    """Per batch: `criterion`'s gradient estimate with respect to the identity head, and each reference's
    control variate from the same batch (all flattened; float64 sums of the dtype of `z1, z2`)."""
    head, control_head = identity_head(z1.shape[1]).to(z1.dtype), identity_head(z1.shape[1]).to(z1.dtype)
    for index in batches:
        estimate = _weight_gradient(criterion(head(z1[index]), head(z2[index]), index), head)
        terms = head_terms(control_head, z1[index], z2[index], temperature)
        yield estimate, [reference.control(terms, index, control_head) for reference in references]


@torch.no_grad()
def warm_up(criterion: nn.Module, z1: Tensor, z2: Tensor, batches: Iterable[Tensor]) -> None:
    """Forward passes only, so that a loss with state (SogCLR's `u`) settles at these projections (the
    identity head's)."""
    for index in batches:
        criterion(z1[index], z2[index], index)


@dataclass(frozen=True)
class EstimateStats:
    """How a loss's gradient estimates relate to the true gradient; all relative to its norm."""

    bias: float  # |mean estimate - truth| / |truth|
    variance: float  # mean |estimate - mean estimate|^2 / |truth|^2 (over single batches)
    cosine: float  # cosine of the angle between the mean estimate and the truth
    noise: float  # standard error of `bias` from the finite number of batches (independent ones)
    estimates: int


class StatsAccumulator:
    """Running sums (float64) over (estimate, control) pairs, compared with `truth`.

    The bias is the mean of estimate - control: each control is an unbiased estimate of `truth` from the
    estimate's own batch, so the difference keeps the bias and loses most of the noise.
    """

    def __init__(self, truth: Tensor) -> None:
        self.truth = truth
        self.total, self.total_difference = torch.zeros_like(truth), torch.zeros_like(truth)
        self.square, self.difference_square, self.count = 0.0, 0.0, 0

    def add(self, estimate: Tensor, control: Tensor) -> None:
        difference = estimate - control
        self.total += estimate
        self.total_difference += difference
        self.square += estimate.square().sum().item()
        self.difference_square += difference.square().sum().item()
        self.count += 1

    def stats(self) -> EstimateStats:
        if self.count == 0:
            raise ValueError("no estimates: the batch size is larger than the dataset")
        scale, count = self.truth.square().sum().item(), self.count
        bias = self.total_difference / count
        spread = max(self.difference_square / count - bias.square().sum().item(), 0.0)
        return EstimateStats(
            bias=math.sqrt(bias.square().sum().item() / scale),
            variance=max(self.square / count - (self.total / count).square().sum().item(), 0.0) / scale,
            cosine=F.cosine_similarity(self.truth + bias, self.truth, dim=0).item(),
            noise=math.sqrt(spread / count / scale),
            estimates=count,
        )


def gradient_bias(
    z1: Tensor,
    z2: Tensor,
    criterion: nn.Module,
    references: Sequence[ExactReference],
    temperature: float,
    batch_size: int,
    passes: int,
    warmup_passes: int = 0,
    seed: int = 0,
) -> list[EstimateStats]:
    """How `criterion`'s mini-batch gradients estimate each reference's gradient (`exact_reference`).

    `z1, z2` `[N, d]` are the frozen projections of the two fixed views; gradients are taken with respect
    to an identity linear head on them. After `warmup_passes` forward-only passes (for SogCLR's `u`),
    `passes` shuffled passes of batches of `batch_size` give one estimate per batch.
    """
    num_images = z1.shape[0]
    # The warm-up draws its own batches: every criterion is measured on the same ones, warmed up or not.
    warmup_generator = torch.Generator().manual_seed(seed + 1)
    warm_up(criterion, z1, z2, shuffled_batches(num_images, batch_size, warmup_passes, warmup_generator))
    batches = shuffled_batches(num_images, batch_size, passes, torch.Generator().manual_seed(seed))
    accumulators = [StatsAccumulator(reference.gradient) for reference in references]
    for estimate, controls in batch_gradients(criterion, references, z1, z2, temperature, batches):
        for accumulator, control in zip(accumulators, controls):
            accumulator.add(estimate, control)
    return [accumulator.stats() for accumulator in accumulators]
