"""Logged statistics of the SogCLR estimator."""

import math

import torch

from sogclr.training.metrics import estimator_stats


def test_estimator_stats_skip_unseen_samples_and_survive_tiny_temperatures() -> None:
    # log u of about 150 (T = 0.005, similarities near 0.75) overflows float32 once exponentiated.
    log_u = torch.tensor([-math.inf, math.log(2.0), 150.0, -math.inf, math.log(4.0)])
    stats = estimator_stats(log_u)
    assert math.isclose(stats["u_min"], 2.0, rel_tol=1e-6) and math.isclose(stats["u_max"], math.exp(150.0))
    assert math.isclose(stats["u_mean"], (2.0 + 4.0 + math.exp(150.0)) / 3, rel_tol=1e-6)
    assert estimator_stats(torch.full((3,), -math.inf)) == {}
