"""The exact global objectives against per-anchor brute force, the gradient-bias diagnostic's limiting cases,
and the epoch-end objective metric: it must leave training untouched (same weights with it on or off)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import build_index
from sogclr.data.datasets import build_pretrain_dataset, sample_rng
from sogclr.data.transforms import PretrainAugment
from sogclr.evaluation.diagnostics import (
    FixedViews,
    GlobalObjective,
    StatsAccumulator,
    anchor_terms,
    batch_gradients,
    evenly_spaced,
    exact_reference,
    global_objective,
    global_objective_pooled_views,
    global_simclr_objective,
    gradient_bias,
    head_terms,
    identity_head,
    in_memory,
)
from sogclr.losses import GlobalContrastiveLoss, SimCLRLoss
from sogclr.model import build_pretrain_model
from sogclr.pretrain import EpochEndEvaluation, epoch_end_metrics
from sogclr.training.checkpoint import load_file
from sogclr.training.loop import Progress
from sogclr.training.metrics import MetricsLogger
from testkit.runs import (
    SINGLE_PROCESS,
    assert_same_training_state,
    start_module,
    tiny_pretrain,
    wait_ok,
    write_config,
)
from testkit.tiny import STEPS_PER_EPOCH

TEMPERATURE = 0.3
OBJECTIVES = [global_objective, global_simclr_objective, global_objective_pooled_views]


def projections(num_images: int, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    z1 = torch.randn(num_images, dim, generator=generator, dtype=torch.float64)
    return z1, z1 + 0.5 * torch.randn(num_images, dim, generator=generator, dtype=torch.float64)


def brute_force_objectives(z1: torch.Tensor, z2: torch.Tensor) -> list[torch.Tensor]:
    """Per anchor (view 1 of every image, then view 2), one anchor at a time: SogCLR's, NT-Xent, and
    SogCLR's with the image's two views pooled (the mean over both anchors' negatives inside the log)."""
    views = [F.normalize(z1, dim=1), F.normalize(z2, dim=1)]
    num_images = z1.shape[0]

    def negative_exps(view: int, i: int) -> torch.Tensor:
        anchor = views[view][i]
        others = [views[v][j] for v in (0, 1) for j in range(num_images) if j != i]
        return torch.stack([torch.exp(anchor @ other / TEMPERATURE) for other in others])

    sogclr, simclr, pooled = [], [], []
    for view, i in itertools.product(range(2), range(num_images)):
        s_pos = views[view][i] @ views[1 - view][i]
        exps, e_pos = negative_exps(view, i), torch.exp(s_pos / TEMPERATURE)
        sogclr.append(TEMPERATURE * torch.log(exps.mean()) - s_pos)
        simclr.append(-torch.log(e_pos / (e_pos + exps.sum())))
        both = torch.cat([negative_exps(0, i), negative_exps(1, i)])
        pooled.append(TEMPERATURE * torch.log(both.mean()) - s_pos)
    return [torch.stack(sogclr), torch.stack(simclr), torch.stack(pooled)]


def test_exact_objectives_and_gradients_match_brute_force() -> None:
    z1, z2 = projections(5)
    ours1, ours2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    terms = anchor_terms(F.normalize(ours1, dim=1), F.normalize(ours2, dim=1), TEMPERATURE, chunk_rows=3)
    ours = [objective(terms, TEMPERATURE) for objective in OBJECTIVES]
    ref1, ref2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    reference = brute_force_objectives(ref1, ref2)
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
    sum(w * o.sum() for w, o in zip((1, 2, 3), ours)).backward()
    sum(w * o.sum() for w, o in zip((1, 2, 3), reference)).backward()
    torch.testing.assert_close(ours1.grad, ref1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours2.grad, ref2.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_exact_gradient_is_the_head_gradient_of_the_brute_force_objective(which: int) -> None:
    z1, z2 = projections(5)
    head = identity_head(z1.shape[1]).double()
    objective = brute_force_objectives(head(z1), head(z2))[which]
    (2 * objective.mean()).backward()  # our losses: mean over images of the sum over both views
    ours = exact_reference(z1, z2, OBJECTIVES[which], TEMPERATURE).gradient
    torch.testing.assert_close(ours, head.weight.grad.flatten(), rtol=1e-10, atol=1e-12)


def every_batch(num_images: int, batch_size: int) -> list[torch.Tensor]:
    return [torch.tensor(batch) for batch in itertools.combinations(range(num_images), batch_size)]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_control_variates_average_to_the_exact_gradient_over_every_batch(which: int) -> None:
    z1, z2 = projections(6)
    reference = exact_reference(z1, z2, OBJECTIVES[which], TEMPERATURE)
    head = identity_head(z1.shape[1]).double()
    controls = [
        reference.control(head_terms(head, z1[batch], z2[batch], TEMPERATURE), batch, head)
        for batch in every_batch(6, 3)
    ]
    torch.testing.assert_close(torch.stack(controls).mean(dim=0), reference.gradient, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "criterion, which", [(SimCLRLoss(TEMPERATURE), 1), (GlobalContrastiveLoss(6, TEMPERATURE, 1.0), 0)]
)
def test_in_batch_bias_is_zero_when_the_batch_is_the_whole_dataset(criterion, which: int) -> None:
    z1, z2 = (z.float() for z in projections(6))
    reference = exact_reference(z1, z2, OBJECTIVES[which], TEMPERATURE)
    [stats] = gradient_bias(z1, z2, criterion, [reference], TEMPERATURE, batch_size=6, passes=3)
    assert stats.estimates == 3
    assert stats.bias < 1e-5 and stats.variance < 1e-10 and stats.cosine > 1 - 1e-9


def test_sogclr_with_gamma_one_is_the_in_batch_estimate() -> None:
    """gamma = 1 discards u however warm it is: the same estimates as a cold loss, and each one the exact
    gradient of the global objective of the batch alone (the in-batch, DCL, estimate)."""
    z1, z2 = (z.float() for z in projections(12))
    reference = exact_reference(z1, z2, global_objective, TEMPERATURE)
    cold, warm = (
        gradient_bias(
            z1, z2, GlobalContrastiveLoss(12, TEMPERATURE, 1.0), [reference], TEMPERATURE, 4, 5, warmup
        )
        for warmup in (0, 7)
    )
    assert warm == cold

    index = torch.tensor([7, 2, 9, 4])
    criterion = GlobalContrastiveLoss(12, TEMPERATURE, 1.0)
    estimate, _ = next(batch_gradients(criterion, [reference], z1, z2, TEMPERATURE, [index]))
    batch_objective = exact_reference(z1[index], z2[index], global_objective, TEMPERATURE).gradient
    torch.testing.assert_close(estimate, batch_objective, rtol=1e-5, atol=1e-6)


def test_sogclr_with_a_settled_u_is_unbiased_for_the_pooled_views_objective() -> None:
    """With u held at each image's mean of its two views' exact g (where it settles as gamma -> 0), SogCLR's
    estimates averaged over every possible batch are the exact gradient of the pooled-views objective, not
    of the per-anchor one; the control-variate bias is that difference, exactly."""
    z1, z2 = (z.float() for z in projections(6))
    criterion = GlobalContrastiveLoss(6, TEMPERATURE, gamma=0.0)  # u' = u: the estimator is frozen
    terms = anchor_terms(F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1), TEMPERATURE)
    criterion.log_u.copy_(torch.logaddexp(*terms.log_mean_neg.view(2, 6)) - math.log(2))
    per_anchor, pooled = (exact_reference(z1, z2, objective, TEMPERATURE) for objective in OBJECTIVES[::2])
    pairs = list(batch_gradients(criterion, [per_anchor, pooled], z1, z2, TEMPERATURE, every_batch(6, 3)))
    mean = torch.stack([estimate for estimate, _ in pairs]).mean(dim=0)
    torch.testing.assert_close(mean, pooled.gradient, rtol=1e-4, atol=1e-6)

    accumulators = [StatsAccumulator(per_anchor.gradient), StatsAccumulator(pooled.gradient)]
    for estimate, controls in pairs:
        for accumulator, control in zip(accumulators, controls):
            accumulator.add(estimate, control)
    against_per_anchor, against_pooled = (accumulator.stats() for accumulator in accumulators)
    difference = (pooled.gradient - per_anchor.gradient).norm() / per_anchor.gradient.norm()
    assert against_per_anchor.bias == pytest.approx(difference.item(), rel=1e-3) and difference > 1e-2
    assert against_pooled.bias < 1e-5


def test_evenly_spaced_subsets() -> None:
    assert evenly_spaced(10, 4) == [0, 2, 5, 7]
    assert evenly_spaced(3, 10) == [0, 1, 2]


def tiny_config(data_dir: Path, **overrides: object) -> PretrainConfig:
    return PretrainConfig.model_validate(tiny_pretrain(data_dir, workers=0, **overrides))


def test_epoch_end_objective_leaves_model_mode_and_rng_as_they_were(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(data_dir, objective_every_epochs=2, objective_subset=40, knn_every_epochs=None)
    index = build_index(cfg)
    dataset = build_pretrain_dataset(cfg, index)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg).train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    rng_before = torch.get_rng_state()
    with MetricsLogger(tmp_path / "metrics.jsonl", total_steps=4) as logger:
        metrics = epoch_end_metrics(cfg, index, dataset, local_batch=16, env=SINGLE_PROCESS)
        evaluate = EpochEndEvaluation(model, metrics, logger, Progress(steps_per_epoch=15, epoch=2))
        evaluate(epoch=0)  # not due
        evaluate(epoch=1)
    assert model.training and torch.equal(torch.get_rng_state(), rng_before)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} changed"
    [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 30 and record["epoch"] == 1

    # The same views, made here: epoch 0's augmentation of 40 evenly spaced images, through the eval model.
    augment = PretrainAugment(cfg.image_size, cfg.crop_min)
    indices = evenly_spaced(len(dataset), 40)
    views = [augment(dataset.open(i), sample_rng(cfg.seed, 0, i)) for i in indices]
    with torch.no_grad():
        z = model.eval()(torch.stack([torch.stack(pair) for pair in views]).flatten(0, 1)).view(40, 2, -1)
    terms = anchor_terms(F.normalize(z[:, 0], dim=1), F.normalize(z[:, 1], dim=1), cfg.temperature)
    assert record["global_objective"] == pytest.approx(
        global_objective(terms, cfg.temperature).mean().item(), rel=1e-5
    )
    pooled = global_objective_pooled_views(terms, cfg.temperature).mean().item()
    assert record["global_objective_pooled_views"] == pytest.approx(pooled, rel=1e-5)
    simclr = 2 * global_simclr_objective(terms, cfg.temperature).mean().item()
    assert record["global_simclr_objective"] == pytest.approx(simclr, rel=1e-5)


def test_fixed_views_are_augmented_once_where_they_fit_in_memory(data_dir: Path) -> None:
    cfg = tiny_config(data_dir)
    dataset = build_pretrain_dataset(cfg, build_index(cfg))
    calls = []

    def augment(image, rng):
        calls.append(1)
        return PretrainAugment(cfg.image_size, cfg.crop_min)(image, rng)

    views = FixedViews(dataset, evenly_spaced(len(dataset), 12), augment)
    kept = in_memory(views, batch_size=5)
    assert len(calls) == 12 + 1 and kept.shape == (12, *views[0].shape)  # + 1: the size of a view
    assert all(torch.equal(kept[k], views[k]) for k in range(12))  # the same pixels as read from disk
    assert in_memory(views, batch_size=5, max_bytes=kept.nbytes - 1) is views

    torch.manual_seed(0)
    model = build_pretrain_model(cfg).eval()
    objective = GlobalObjective(dataset, augment, 12, cfg.temperature, batch_size=5)
    first = objective(model)
    calls.clear()
    assert objective(model) == first and not calls  # the second evaluation augmented no image


def test_pretraining_with_the_objective_metric_ends_with_the_same_weights(
    tmp_path: Path, data_dir: Path
) -> None:
    off, on = tmp_path / "off", tmp_path / "on"
    runs = [
        start_module("sogclr.pretrain", write_config(off, tiny_pretrain(data_dir))),
        start_module(
            "sogclr.pretrain",
            write_config(on, tiny_pretrain(data_dir, objective_every_epochs=1, objective_subset=100)),
        ),
    ]
    for run in runs:
        wait_ok(run)
    assert_same_training_state(off / "checkpoints" / "final.pt", on / "checkpoints" / "final.pt")
    rng_off, rng_on = (load_file(run / "checkpoints" / "final.pt")["rng"] for run in (off, on))
    assert torch.equal(rng_off["torch"], rng_on["torch"])
    assert torch.equal(rng_off["python"]["internal"], rng_on["python"]["internal"])
    assert torch.equal(rng_off["numpy"]["keys"], rng_on["numpy"]["keys"])
    records = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines()]
    objectives = [(r["step"], r["epoch"]) for r in records if "global_objective" in r]
    assert objectives == [(STEPS_PER_EPOCH, 0), (2 * STEPS_PER_EPOCH, 1)]
