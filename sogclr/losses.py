"""Contrastive losses: SogCLR's global contrastive loss and the SimCLR (NT-Xent) baseline.

Both losses L2-normalise the projections of the two views of the local batch, gather them from every
rank with an all-gather whose backward sums the gradient over ranks, and contrast each of the 2b local
anchors with all 2B views of the global batch. The gathered views are ordered (rank, view, sample), so
the column of an anchor and of its positive are found by arithmetic instead of [b, 2B] one-hot masks.

The loss is a mean over local anchors: with DDP averaging parameter gradients over W ranks, training
follows the gradient of the single-process loss over the global batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import Tensor, nn

from sogclr.distributed import all_gather_cat


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate `x` from every rank; the backward sums the gradient over ranks, then takes our slice."""
    if not _distributed():
        return x
    return torch.cat(dist_nn.all_gather(x), dim=0)


class _Similarities(NamedTuple):
    """Cosine similarities of the local anchors to every view of the global batch."""

    anchors: Tensor  # [2b, d] unit-norm local views: the b first views, then the b second views
    sim: Tensor  # [2b, 2B] float32 similarity of each anchor to each gathered view
    self_col: Tensor  # [2b, 1] column of the anchor itself
    pos_col: Tensor  # [2b, 1] column of its positive, the other view of the same image


def _similarities(z1: Tensor, z2: Tensor) -> _Similarities:
    """Normalise the two views' projections `[b, d]`, gather them over ranks and compare (one matmul)."""
    # float32 even under autocast: exp(s / T) turns bf16's rounding of s (about 4e-3) into 4% at T = 0.1
    with torch.autocast(z1.device.type, enabled=False):
        anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)
        sim = anchors @ _all_gather_with_grad(anchors).T
    rows = anchors.shape[0]
    rank = dist.get_rank() if _distributed() else 0
    self_col = torch.arange(rank * rows, (rank + 1) * rows, device=sim.device).unsqueeze(1)
    return _Similarities(anchors, sim, self_col, pos_col=self_col.roll(rows // 2, dims=0))


class GlobalContrastiveLoss(nn.Module):
    """SogCLR's loss (Yuan et al., ICML 2022): contrast with a per-image moving average of the negatives.

    For anchor i with negatives j (all 2B gathered views except itself and its positive, n = 2(B-1)),
    e_ij = exp(s_ij / T) and g_i = mean_j e_ij. The estimator of image i is updated per view,
    u'_i = (1 - gamma) u_i + gamma g_i (gamma = 1 on the image's first visit), the image stores the mean
    of its two views' u', and the surrogate loss -s_pos + mean_j (e_ij / u'_i) s_ij, with the weights
    e / u' detached, has the gradient of the global contrastive objective T log u - s_pos.

    The estimator is kept as the buffer `log_u` (in `state_dict`; -inf marks an image never seen), so
    that exp(s / T) never has to be represented: at T = 0.005 it ranges over e^-200 .. e^200, beyond
    float32 whatever fixed shift is chosen. `u` is exp(log_u), recomputed on each access.

    Every rank gathers all B (index, u) pairs and writes them, so `log_u` stays identical on every rank.
    An index that occurs twice in one global batch (our sampler never does this) gets the larger of its
    updates: unlike last-writer-wins, max gives the same result on every device and in every order.

    After each forward, `objective` holds the detached mean over local anchors and both views of
    T log u'_i - s_pos, for logging without a device sync.
    """

    def __init__(self, num_samples: int, temperature: float = 0.1, gamma: float = 0.9) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.temperature = temperature
        self.gamma = gamma  # a plain float: the training loop may set it every step (gamma schedule)
        self.register_buffer("log_u", torch.full((num_samples,), -math.inf))
        self.objective: Tensor | None = None

    @property
    def u(self) -> Tensor:
        """The estimator per dataset index, float32, 0 if never seen; a new tensor: write `log_u` instead."""
        return self.log_u.exp()

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, temperature={self.temperature}, gamma={self.gamma}"

    def forward(self, z1: Tensor, z2: Tensor, index: Tensor) -> Tensor:
        """Loss of the local batch: projections `z1, z2` `[b, d]`, dataset indices `index` `[b]`."""
        pairs = _similarities(z1, z2)
        num_neg = pairs.sim.shape[1] - 2
        if num_neg < 1:
            raise ValueError("GlobalContrastiveLoss needs a global batch of at least 2 images")
        with torch.no_grad():
            log_e = pairs.sim / self.temperature
            log_e.scatter_(1, torch.cat([pairs.self_col, pairs.pos_col], dim=1), -math.inf)
            # One exp for both the batch estimate and the weights; shifting by the row max keeps e <= 1
            row_max = log_e.amax(dim=1)
            e = log_e.sub_(row_max.unsqueeze(1)).exp_()
            log_g = row_max + e.sum(dim=1).log() - math.log(num_neg)
            log_u_views = self._update_estimator(log_g, index.to(self.log_u.device))
            weights = e.mul_((row_max - log_u_views).exp().unsqueeze(1))  # e_ij / u'_i, at most n / gamma
        s_pos = (pairs.anchors * pairs.anchors.roll(z1.shape[0], dims=0)).sum(dim=1)
        weighted_neg = torch.dot(weights.flatten(), pairs.sim.flatten()) / num_neg
        self.objective = (self.temperature * log_u_views - s_pos.detach()).mean()
        return (weighted_neg - s_pos.sum()) / z1.shape[0]

    def _update_estimator(self, log_g: Tensor, index: Tensor) -> Tensor:
        """Moving averages u' of both views' batch estimates `log_g` `[2b]`; stores their mean; log u'."""
        log_u = self.log_u[index]
        gamma = torch.where(log_u.isfinite(), self.gamma, 1.0)  # first visit: u' is the batch estimate
        log_decayed = (log_u + torch.log1p(-gamma)).repeat(2)  # log (1 - gamma) u
        log_u_views = torch.logaddexp(log_decayed, log_g + gamma.log().repeat(2))
        log_u_mean = torch.logaddexp(*log_u_views.view(2, -1)) - math.log(2)
        self.log_u.scatter_reduce_(
            0, all_gather_cat(index), all_gather_cat(log_u_mean), reduce="amax", include_self=False
        )
        return log_u_views


class SimCLRLoss(nn.Module):
    """NT-Xent (SimCLR): cross-entropy over s / T, positive in the denominator, the anchor itself out.

    The loss is the mean over local anchors of the sum over the two views; `objective` is the same value,
    detached, so that the training loop logs both losses alike.
    """

    def __init__(self, temperature: float = 0.1) -> None:
        super().__init__()
        self.temperature = temperature
        self.objective: Tensor | None = None

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    def forward(self, z1: Tensor, z2: Tensor, index: Tensor | None = None) -> Tensor:
        """Loss of the local batch: projections `z1, z2` `[b, d]`; `index` is unused."""
        pairs = _similarities(z1, z2)
        logits = pairs.sim / self.temperature
        logits.scatter_(1, pairs.self_col, -math.inf)
        loss = 2 * F.cross_entropy(logits, pairs.pos_col.squeeze(1))  # 2x: the views are summed
        self.objective = loss.detach()
        return loss
