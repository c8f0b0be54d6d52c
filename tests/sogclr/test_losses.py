"""The losses against naive per-anchor transcriptions of NOTES-sogclr.md, in float64, on random inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sogclr.losses import GlobalContrastiveLoss, SimCLRLoss

NUM_SAMPLES = 12


def naive_sogclr_step(
    z1: torch.Tensor, z2: torch.Tensor, u_prev: list[float | None], temperature: float, gamma: float
) -> tuple[torch.Tensor, float, list[float]]:
    """NOTES "The loss", steps 1-6, one anchor at a time. `u_prev[i]` is None for a first visit.

    Returns the loss (differentiable), the objective, and each image's new u (the mean of its views).
    """
    h1, h2 = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    batch = h1.shape[0]
    num_neg = 2 * (batch - 1)
    loss, objective, u_new = 0.0, 0.0, [0.0] * batch
    for anchors, others in ((h1, h2), (h2, h1)):
        for i in range(batch):
            row = [anchors[i] @ others[j] for j in range(batch)] + [
                anchors[i] @ anchors[j] for j in range(batch)
            ]
            s_pos = row[i]
            negatives = [s for j, s in enumerate(row) if j not in (i, batch + i)]
            e = [torch.exp(s / temperature) for s in negatives]
            g = sum(e).item() / num_neg
            u = g if u_prev[i] is None else (1 - gamma) * u_prev[i] + gamma * g
            weighted = sum((e_j.detach() / u) * s_j for e_j, s_j in zip(e, negatives))
            loss = loss + (-s_pos + weighted / num_neg) / batch
            objective += (temperature * math.log(u) - s_pos.item()) / (2 * batch)
            u_new[i] += u / 2
    return loss, objective, u_new


def random_views(batch: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_()


# Steps over a dataset of 12 images: repeated images, first visits, and a change of gamma (a schedule).
STEPS = [
    ([0, 1, 2, 3, 4, 5], 0.9),
    ([3, 4, 6, 7, 0, 8], 0.9),
    ([9, 3, 4, 1, 6, 10], 0.5),
]


@pytest.mark.parametrize("temperature", [0.1, 0.005])
def test_sogclr_matches_naive_over_steps(temperature: float) -> None:
    crit = GlobalContrastiveLoss(NUM_SAMPLES, temperature=temperature)
    u_naive: dict[int, float] = {}
    for step, (index, gamma) in enumerate(STEPS):
        crit.gamma = gamma
        z1, z2 = random_views(len(index), seed=step)
        ours1, ours2 = leaf(z1), leaf(z2)
        loss = crit(ours1, ours2, torch.tensor(index))
        loss.backward()

        ref1, ref2 = leaf(z1.double()), leaf(z2.double())
        ref_loss, ref_objective, u_new = naive_sogclr_step(
            ref1, ref2, [u_naive.get(k) for k in index], temperature, gamma
        )
        ref_loss.backward()
        u_naive.update(zip(index, u_new))

        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crit.objective.item(), ref_objective, rtol=1e-5, atol=1e-5)
        # float32 rounding of s is amplified by 1/T in exp(s/T): looser at T = 0.005
        tolerance = 1e-5 if temperature == 0.1 else 1e-3
        torch.testing.assert_close(ours1.grad.double(), ref1.grad, rtol=tolerance, atol=1e-6)
        torch.testing.assert_close(ours2.grad.double(), ref2.grad, rtol=tolerance, atol=1e-6)
        # compare in log space: at T = 0.005, u spans e^-200 .. e^200 (float64 holds it, float32 not)
        expected_log_u = torch.full((NUM_SAMPLES,), -math.inf, dtype=torch.float64)
        for k, u in u_naive.items():
            expected_log_u[k] = math.log(u)
        torch.testing.assert_close(crit.log_u.double(), expected_log_u, rtol=1e-5, atol=tolerance)


def test_u_starts_at_zero_and_holds_the_estimate() -> None:
    crit = GlobalContrastiveLoss(NUM_SAMPLES)
    assert crit.u.dtype == torch.float32 and crit.u.shape == (NUM_SAMPLES,)
    assert not crit.u.any()
    z1, z2 = random_views(4)
    crit(z1, z2, torch.tensor([5, 2, 7, 1]))
    _, _, u_new = naive_sogclr_step(z1, z2, [None] * 4, crit.temperature, crit.gamma)
    expected = torch.zeros(NUM_SAMPLES, dtype=torch.float64)
    expected[[5, 2, 7, 1]] = torch.tensor(u_new, dtype=torch.float64)
    torch.testing.assert_close(crit.u.double(), expected, rtol=1e-5, atol=0)


def test_gradient_is_temperature_times_infonce_without_positive_when_gamma_is_one() -> None:
    temperature, batch = 0.2, 5
    crit = GlobalContrastiveLoss(NUM_SAMPLES, temperature=temperature, gamma=1.0)
    index = torch.arange(batch)
    crit(*random_views(batch, seed=1), index)  # the images are seen: gamma = 1 must still discard old u
    z1, z2 = random_views(batch, seed=2)
    ours1, ours2 = leaf(z1), leaf(z2)
    crit(ours1, ours2, index).backward()

    ref1, ref2 = leaf(z1.double()), leaf(z2.double())
    h = F.normalize(torch.cat([ref1, ref2]), dim=1)
    logits = h @ h.T / temperature
    positive = torch.arange(2 * batch).roll(batch)
    negative = ~torch.eye(2 * batch, dtype=torch.bool)
    negative[torch.arange(2 * batch), positive] = False
    log_mean_neg = logits.masked_fill(~negative, -math.inf).logsumexp(dim=1) - math.log(2 * (batch - 1))
    infonce = (-logits[torch.arange(2 * batch), positive] + log_mean_neg).sum() / batch
    infonce.backward()

    torch.testing.assert_close(ours1.grad.double(), temperature * ref1.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours2.grad.double(), temperature * ref2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_small_temperature_is_finite_in_float32(aligned: bool) -> None:
    """At T = 0.005, exp(s/T) overflows float32 for aligned views and underflows for random ones."""
    crit = GlobalContrastiveLoss(NUM_SAMPLES, temperature=0.005)
    for step in range(3):
        z1, z2 = random_views(8, dim=128, seed=step)
        if aligned:
            z2 = z1 + 0.01 * z2
        z1, z2 = leaf(z1), leaf(z2)
        loss = crit(z1, z2, torch.arange(step, step + 8))
        loss.backward()
        assert loss.isfinite() and crit.objective.isfinite()
        assert z1.grad.isfinite().all() and z2.grad.isfinite().all()
    assert crit.log_u[:10].isfinite().all()


def test_repeated_index_in_one_batch_keeps_the_larger_update() -> None:
    crit = GlobalContrastiveLoss(NUM_SAMPLES)
    z1, z2 = random_views(4, seed=3)
    crit(z1, z2, torch.tensor([4, 9, 4, 2]))
    _, _, u_new = naive_sogclr_step(z1, z2, [None] * 4, crit.temperature, crit.gamma)
    expected = {4: max(u_new[0], u_new[2]), 9: u_new[1], 2: u_new[3]}
    for k, u in expected.items():
        assert crit.u[k].item() == pytest.approx(u, rel=1e-5)


def test_state_dict_restores_the_estimator() -> None:
    crit = GlobalContrastiveLoss(NUM_SAMPLES)
    crit(*random_views(6), torch.arange(6))
    restored = GlobalContrastiveLoss(NUM_SAMPLES)
    restored.load_state_dict(crit.state_dict())
    z1, z2, index = *random_views(6, seed=1), torch.arange(3, 9)
    torch.testing.assert_close(restored(z1, z2, index), crit(z1, z2, index), rtol=0, atol=0)
    torch.testing.assert_close(restored.log_u, crit.log_u, rtol=0, atol=0)


@pytest.mark.parametrize("make_loss", [lambda: GlobalContrastiveLoss(NUM_SAMPLES), SimCLRLoss])
def test_losses_stay_float32_under_autocast(make_loss) -> None:
    z1, z2 = random_views(6, dim=32)
    index = torch.arange(6)
    expected = make_loss()(z1, z2, index)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = make_loss()(z1, z2, index)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.005])
def test_simclr_matches_cross_entropy_on_explicit_logits(temperature: float) -> None:
    batch = 6
    z1, z2 = random_views(batch)
    ours1, ours2 = leaf(z1), leaf(z2)
    crit = SimCLRLoss(temperature)
    loss = crit(ours1, ours2)
    loss.backward()

    ref1, ref2 = leaf(z1.double()), leaf(z2.double())
    h1, h2 = F.normalize(ref1, dim=1), F.normalize(ref2, dim=1)
    self_mask = torch.eye(batch, dtype=torch.bool)
    target = torch.arange(batch)
    ref_loss = 0.0
    for anchors, others in ((h1, h2), (h2, h1)):
        # the layout of NOTES step 2: [anchor . other view | anchor . same view], positive at column i
        logits = torch.cat([anchors @ others.T, (anchors @ anchors.T).masked_fill(self_mask, -math.inf)], 1)
        ref_loss = ref_loss + F.cross_entropy(logits / temperature, target)
    ref_loss.backward()

    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(crit.objective, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ours1.grad.double(), ref1.grad, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(ours2.grad.double(), ref2.grad, rtol=1e-3, atol=1e-5)
