"""Both losses on 2 gloo processes, each with half of the global batch, against one process with all of it.

Rank r's loss is the mean over its b anchors, so the sum of the W ranks' losses is W times the
single-process loss; the autograd-correct gather therefore leaves W times the full-batch gradient on
each rank's local projections (DDP then divides parameter gradients by W).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sogclr.losses import GlobalContrastiveLoss, SimCLRLoss

WORLD = 2
NUM_SAMPLES = 16
TEMPERATURE = 0.1
# Global batches of 6 images: images recur across steps and across ranks; gamma changes at step 3.
STEPS = [
    ([0, 1, 2, 3, 4, 5], 0.9),
    ([6, 3, 7, 0, 8, 9], 0.9),
    ([1, 10, 6, 11, 4, 3], 0.6),
]
LOSSES = {
    "sogclr": lambda: GlobalContrastiveLoss(NUM_SAMPLES, TEMPERATURE),
    "simclr": lambda: SimCLRLoss(TEMPERATURE),
}


def global_batch(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(batch, 8, generator=generator), torch.randn(batch, 8, generator=generator)


def run_steps(crit: torch.nn.Module, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    """Loss, objective, gradients of the local projections and u (if any) after each step."""
    records = []
    for step, (index, gamma) in enumerate(STEPS):
        if isinstance(crit, GlobalContrastiveLoss):
            crit.gamma = gamma
        local = slice(rank * len(index) // world, (rank + 1) * len(index) // world)
        z1, z2 = (z[local].clone().requires_grad_() for z in global_batch(step, len(index)))
        loss = crit(z1, z2, torch.tensor(index)[local])
        loss.backward()
        record = {"loss": loss.detach(), "objective": crit.objective, "z1_grad": z1.grad, "z2_grad": z2.grad}
        if isinstance(crit, GlobalContrastiveLoss):
            record["u"] = crit.u
        records.append(record)
    return records


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        records = {name: run_steps(make(), rank, WORLD) for name, make in LOSSES.items()}
        torch.save(records, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, list[dict[str, torch.Tensor]]]]:
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(rank_main, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD)]


@pytest.mark.parametrize("name", LOSSES)
def test_two_ranks_match_one_process(per_rank, name: str) -> None:
    single = run_steps(LOSSES[name](), rank=0, world=1)
    for step, full in enumerate(single):
        ranks = [records[name][step] for records in per_rank]
        for key in ("loss", "objective"):
            mean_over_ranks = torch.stack([r[key] for r in ranks]).mean()
            torch.testing.assert_close(mean_over_ranks, full[key], rtol=1e-5, atol=1e-6)
        for key in ("z1_grad", "z2_grad"):
            gathered = torch.cat([r[key] for r in ranks])
            torch.testing.assert_close(gathered, WORLD * full[key], rtol=1e-5, atol=1e-6)


def test_u_is_identical_on_every_rank_and_equals_one_process(per_rank) -> None:
    single = run_steps(LOSSES["sogclr"](), rank=0, world=1)
    for step, full in enumerate(single):
        rank0, rank1 = (records["sogclr"][step]["u"] for records in per_rank)
        torch.testing.assert_close(rank0, rank1, rtol=0, atol=0)
        torch.testing.assert_close(rank0, full["u"], rtol=1e-6, atol=0)
        assert (rank0 > 0).sum() == len(set().union(*(index for index, _ in STEPS[: step + 1])))
