"""LARS against hand computations and a per-parameter reference loop; parameter groups; schedules."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from sogclr.optim import LARS, build_optimizer, param_groups, scaled_lr
from sogclr.schedules import gamma_at, set_lr, warmup_cosine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _set_random_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


# ---------------------------------------------------------------------------------------------------- LARS


def test_lars_step_by_hand():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[6.0, 0.0, 8.0], [0.0, 0.0, 0.0]]))  # norm 10
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    # With weight_decay 0.5 the decayed weight gradient is [[0, 3, 4], [0, 0, 0]]: norm 5.
    layer.weight.grad = torch.tensor([[-3.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    layer.bias.grad = torch.tensor([0.5, 0.25])
    grads_before = [layer.weight.grad.clone(), layer.bias.grad.clone()]
    optimizer = LARS(layer.parameters(), lr=2.0, weight_decay=0.5, momentum=0.9, trust_coefficient=0.1)

    optimizer.step()
    # Trust ratio 0.1 * 10 / 5 = 0.2: update [[0, 0.6, 0.8], 0]; the bias moves by lr * grad only.
    torch.testing.assert_close(layer.weight, torch.tensor([[6.0, -1.2, 6.4], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(layer.bias, torch.tensor([0.0, -1.5]))
    torch.testing.assert_close([layer.weight.grad, layer.bias.grad], grads_before)

    optimizer.step()
    # Bias momentum buffer 0.9 * g + g = 1.9 g.
    torch.testing.assert_close(layer.bias, torch.tensor([0.0 - 2 * 1.9 * 0.5, -1.5 - 2 * 1.9 * 0.25]))


def test_lars_zero_norms_use_ratio_one():
    zero_weight = nn.Parameter(torch.zeros(2, 2))
    zero_grad = nn.Parameter(torch.full((2, 2), 3.0))
    all_zero = nn.Parameter(torch.zeros(2, 2))
    zero_weight.grad = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    zero_grad.grad = torch.zeros(2, 2)
    all_zero.grad = torch.zeros(2, 2)
    LARS([zero_weight, zero_grad, all_zero], lr=0.5, trust_coefficient=0.001).step()

    torch.testing.assert_close(zero_weight.detach(), torch.tensor([[-0.5, 0.0], [0.0, 1.0]]))
    assert torch.equal(zero_grad.detach(), torch.full((2, 2), 3.0))
    assert torch.equal(all_zero.detach(), torch.zeros(2, 2))


def _reference_lars_step(groups: list[dict], buffers: dict[int, torch.Tensor]) -> None:
    """MoCo v3's LARS written out parameter by parameter (the rule LARS must reproduce)."""
    with torch.no_grad():
        for group in groups:
            for p in group["params"]:
                update = p.grad
                if p.ndim > 1:
                    update = update + group["weight_decay"] * p
                    p_norm, u_norm = p.norm(), update.norm()
                    if p_norm > 0 and u_norm > 0:
                        update = update * group["trust_coefficient"] * p_norm / u_norm
                mu = buffers.setdefault(id(p), torch.zeros_like(p))
                mu.mul_(group["momentum"]).add_(update)
                p.sub_(group["lr"] * mu)


def test_lars_matches_reference_loop_over_steps_and_groups():
    model = _tiny_net()
    reference = copy.deepcopy(model)
    hyper = dict(weight_decay=1e-2, momentum=0.9, trust_coefficient=0.02)
    head = [model[3].weight, model[3].bias]
    body = [p for p in model.parameters() if all(p is not q for q in head)]
    optimizer = LARS([{"params": body}, {"params": head, "lr": 0.3}], lr=1.5, **hyper)
    ref_head = [reference[3].weight, reference[3].bias]
    ref_body = [p for p in reference.parameters() if all(p is not q for q in ref_head)]
    ref_groups = [{"params": ref_body, "lr": 1.5, **hyper}, {"params": ref_head, "lr": 0.3, **hyper}]
    buffers: dict[int, torch.Tensor] = {}

    for _ in range(3):
        _set_random_grads(model)
        for p, q in zip(model.parameters(), reference.parameters()):
            q.grad = p.grad.clone()
        optimizer.step()
        _reference_lars_step(ref_groups, buffers)

    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    assert not torch.equal(model[0].weight, _tiny_net()[0].weight)


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_lars_state_dict_roundtrip_gives_identical_steps():
    model = _tiny_net()
    optimizer = LARS(model.parameters(), lr=0.5, weight_decay=1e-3)
    for _ in range(2):
        _set_random_grads(model)
        optimizer.step()
    resumed_model, fresh_model = copy.deepcopy(model), copy.deepcopy(model)
    resumed = LARS(resumed_model.parameters(), lr=0.5, weight_decay=1e-3)
    resumed.load_state_dict(_roundtrip(optimizer.state_dict()))
    fresh = LARS(fresh_model.parameters(), lr=0.5, weight_decay=1e-3)

    _set_random_grads(model)
    for other in (resumed_model, fresh_model):
        for p, q in zip(model.parameters(), other.parameters()):
            q.grad = p.grad.clone()
    for opt in (optimizer, resumed, fresh):
        opt.step()

    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    # Without the momentum state the step differs, so the equality above is not vacuous.
    assert not torch.equal(model[0].weight, fresh_model[0].weight)


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        LARS(_tiny_net().parameters(), lr=0.1, momentum=1.0)


# ------------------------------------------------------------------------------------ groups and builders


def test_param_groups_exclude_1d_and_frozen_parameters():
    model = _tiny_net()
    model[0].bias.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.05)

    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    decay_ids = {id(p) for p in groups[0]["params"]}
    no_decay_ids = {id(p) for p in groups[1]["params"]}
    assert decay_ids == {id(model[0].weight), id(model[3].weight)}
    assert no_decay_ids == {id(model[1].weight), id(model[1].bias), id(model[3].bias)}


def test_param_groups_drop_empty_group():
    groups = param_groups(nn.Linear(3, 2, bias=False), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    ("name", "weight_factor"),
    [
        ("sgd", 1 - 0.5 * 0.1),  # gradient wd * w, first momentum step moves by lr * wd * w
        ("adamw", 1 - 0.5 * 0.1),  # decoupled decay; a zero gradient gives a zero Adam step
        ("lars", 1 - 0.5 * 0.01),  # update wd * w rescaled to norm tc * |w|: moves by lr * tc * w
    ],
)
def test_build_optimizer_decays_only_matrices(name, weight_factor):
    model = nn.Linear(4, 3)
    weight, bias = model.weight.detach().clone(), model.bias.detach().clone()
    optimizer = build_optimizer(model, name, lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    torch.testing.assert_close(model.weight.detach(), weight * weight_factor)
    assert torch.equal(model.bias.detach(), bias)


def test_build_optimizer_settings():
    model = _tiny_net()
    adamw = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05, momentum=0.8)
    assert adamw.defaults["betas"] == (0.8, 0.999)
    sgd = build_optimizer(model, "sgd", lr=0.1, weight_decay=0.0, momentum=0.9)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["foreach"]
    with pytest.raises(ValueError, match="lars, sgd or adamw"):
        build_optimizer(model, "adam", lr=0.1, weight_decay=0.0, momentum=0.9)


def test_scaled_lr():
    assert scaled_lr(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scaled_lr(0.075, 4096, "sqrt") == pytest.approx(4.8)
    assert scaled_lr(0.1, 1024, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.3, 1024, "none") == 0.3
    with pytest.raises(ValueError, match="sqrt, linear or none"):
        scaled_lr(0.1, 256, "log")


# ---------------------------------------------------------------------------------------------- schedules


def test_warmup_cosine_key_steps():
    total, warmup, peak = 100, 10, 2.0
    assert warmup_cosine(0, total, warmup, peak) == 0.0
    assert warmup_cosine(5, total, warmup, peak) == pytest.approx(1.0)
    assert warmup_cosine(9, total, warmup, peak) == pytest.approx(1.8)
    assert warmup_cosine(10, total, warmup, peak) == pytest.approx(2.0)
    assert warmup_cosine(55, total, warmup, peak) == pytest.approx(1.0)
    assert warmup_cosine(99, total, warmup, peak) == pytest.approx(1.0 + math.cos(math.pi * 89 / 90))
    assert warmup_cosine(100, total, warmup, peak) == pytest.approx(0.0)
    assert warmup_cosine(150, total, warmup, peak) == pytest.approx(0.0)


def test_warmup_cosine_matches_moco_v3_epoch_fraction_rule():
    epochs, warmup_epochs, steps_per_epoch, peak = 6, 2, 7, 0.9

    def moco_v3(epoch: float) -> float:
        if epoch < warmup_epochs:
            return peak * epoch / warmup_epochs
        return peak * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))

    for step in range(epochs * steps_per_epoch):
        expected = moco_v3(step / steps_per_epoch)
        got = warmup_cosine(step, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, peak)
        assert got == pytest.approx(expected), step


def test_warmup_cosine_without_warmup_starts_at_peak():
    assert warmup_cosine(0, 10, 0, 3.0) == 3.0
    assert warmup_cosine(5, 10, 0, 3.0) == pytest.approx(1.5)


def test_gamma_constant():
    assert [gamma_at(s, 100, 0.9, "constant", 0.5) for s in (0, 50, 99)] == [0.9, 0.9, 0.9]


def test_gamma_cosine():
    total, gamma, fraction = 200, 0.2, 0.5  # decays over the first 100 steps
    assert gamma_at(0, total, gamma, "cosine", fraction) == 1.0
    assert gamma_at(50, total, gamma, "cosine", fraction) == pytest.approx((1.0 + gamma) / 2)
    assert gamma_at(25, total, gamma, "cosine", fraction) == pytest.approx(
        gamma + (1 - gamma) * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert gamma_at(100, total, gamma, "cosine", fraction) == gamma
    assert gamma_at(199, total, gamma, "cosine", fraction) == gamma
    with pytest.raises(ValueError, match="constant or cosine"):
        gamma_at(0, total, gamma, "linear", fraction)


def test_set_lr_sets_every_group():
    model = _tiny_net()
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4, momentum=0.9)
    set_lr(optimizer, 0.025)
    assert [g["lr"] for g in optimizer.param_groups] == [0.025, 0.025]
