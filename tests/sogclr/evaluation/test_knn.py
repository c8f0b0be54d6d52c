"""The kNN monitor: weighted votes on a constructed feature set with a known answer, the monitor's numbers
against the backbone's features computed here, 2 gloo ranks against one process, and a pretraining run
with the monitor on, stopped and resumed, ending with the weights of a run with it off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sogclr.contract.config import PretrainConfig
from sogclr.contract.dataindex import build_index
from sogclr.data.datasets import build_plain_dataset, build_pretrain_dataset
from sogclr.distributed import DistEnv
from sogclr.evaluation import knn
from sogclr.evaluation.diagnostics import evenly_spaced
from sogclr.evaluation.knn import KnnMonitor, knn_accuracy, knn_votes
from sogclr.model import build_pretrain_model
from sogclr.pretrain import EpochEndEvaluation, epoch_end_metrics
from sogclr.training.loop import Progress
from sogclr.training.metrics import MetricsLogger
from testkit.runs import (
    SINGLE_PROCESS,
    assert_same_training_state,
    interrupt_at,
    run_module,
    start_module,
    tiny_pretrain,
    wait_ok,
    write_config,
)
from testkit.tiny import STEPS_PER_EPOCH

BANK_SUBSET = 200


def unit(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


# A query at angle 0; two bank images of class 0 at +-0.5 rad, one of class 1 at 0.1 rad, one of class 2
# opposite. Its three neighbours: class 1 nearest, class 0 twice further away.
BANK, BANK_LABELS = unit(0.5, -0.5, 0.1, math.pi), torch.tensor([0, 0, 1, 2])


def test_votes_are_the_neighbours_weights_by_class() -> None:
    near, far = math.cos(0.1), math.cos(0.5)
    for temperature in (0.07, 1.0):
        votes = knn_votes(BANK, BANK_LABELS, unit(0.0), num_classes=3, k=3, temperature=temperature)
        # exp(s / T) up to one factor per query (the largest similarity is taken out)
        expected = torch.tensor([[2 * math.exp((far - near) / temperature), 1.0, 0.0]])
        torch.testing.assert_close(votes, expected)
    # a low temperature lets the single nearest neighbour outvote two further ones; a high one does not
    assert knn_votes(BANK, BANK_LABELS, unit(0.0), 3, k=3, temperature=0.07).argmax() == 1
    assert knn_votes(BANK, BANK_LABELS, unit(0.0), 3, k=3, temperature=1.0).argmax() == 0
    assert knn_votes(BANK, BANK_LABELS, unit(0.0), 3, k=1, temperature=1.0).argmax() == 1
    assert knn_votes(BANK, BANK_LABELS, unit(0.0), 3, k=4, temperature=1.0)[0, 2] > 0  # k = all votes


def test_accuracy_top1_and_top5_in_percent(monkeypatch: pytest.MonkeyPatch) -> None:
    # Queries next to each bank image: the nearest decides at k=1. Labels: 3 right, 1 wrong.
    queries = unit(0.45, -0.45, 0.12, math.pi - 0.1)
    labels = torch.tensor([0, 0, 1, 0])
    assert knn_accuracy(BANK, BANK_LABELS, queries, labels, 3, k=1) == {"top1": 75.0, "top5": 100.0}
    # six classes at growing angles from three queries at angle 0, all six neighbours voting: class 0
    # ranks first, class 5 sixth. Right at top-1, right at top-5 only, wrong at both.
    six_classes = unit(0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    accuracy = knn_accuracy(six_classes, torch.arange(6), unit(0, 0, 0), torch.tensor([0, 4, 5]), 6, k=6)
    assert accuracy == pytest.approx({"top1": 100 / 3, "top5": 200 / 3})
    # in chunks of one query at a time: the same numbers
    features = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.arange(50) % 7
    whole = knn_accuracy(features[:30], labels[:30], features[30:], labels[30:], 7, k=5)
    monkeypatch.setattr(knn, "CHUNK_ELEMENTS", 30)
    assert knn_accuracy(features[:30], labels[:30], features[30:], labels[30:], 7, k=5) == whole


def knn_config(data_dir: Path) -> PretrainConfig:
    return PretrainConfig.model_validate(
        tiny_pretrain(data_dir, workers=0, knn_every_epochs=1, knn_subset=BANK_SUBSET, knn_k=10)
    )


def test_monitor_logs_the_knn_accuracy_of_the_backbone(tmp_path: Path, data_dir: Path) -> None:
    cfg = knn_config(data_dir)
    torch.manual_seed(0)
    model = build_pretrain_model(cfg)
    with MetricsLogger(tmp_path / "metrics.jsonl", total_steps=4) as logger:
        index = build_index(cfg)
        metrics = epoch_end_metrics(cfg, index, build_pretrain_dataset(cfg, index), 64, SINGLE_PROCESS)
        EpochEndEvaluation(model, metrics, logger, Progress(steps_per_epoch=22, epoch=1))(epoch=0)
    [record] = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 22 and record["epoch"] == 0

    # The same here: un-augmented images through the eval-mode backbone, the bank evenly spaced.
    train, val = build_plain_dataset(cfg, index, "train"), build_plain_dataset(cfg, index, "val")
    bank_index = evenly_spaced(len(train), BANK_SUBSET)

    def features(dataset, indices):
        images = torch.stack([dataset[i][0] for i in indices])
        with torch.no_grad():
            return F.normalize(model.eval().backbone(images), dim=1), torch.tensor(
                [dataset[i][1] for i in indices]
            )

    bank, bank_labels = features(train, bank_index)
    queries, labels = features(val, range(len(val)))
    expected = knn_accuracy(bank, bank_labels, queries, labels, 10, k=10, temperature=cfg.knn_temperature)
    assert record["knn_top1"] == pytest.approx(expected["top1"]) and 0 < record["knn_top1"] < 100
    assert record["knn_top5"] == pytest.approx(expected["top5"]) and record["knn_top5"] > record["knn_top1"]


def monitor_on_rank(rank: int, world: int, init_file: str, out_dir: str, data_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        cfg = knn_config(Path(data_dir))
        env = DistEnv(rank, rank, world, torch.device("cpu"))
        result = KnnMonitor(cfg, build_index(cfg), env, batch_size=32, dtype=None)(
            build_pretrain_model(cfg).eval()
        )
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_two_ranks_give_the_numbers_of_one_process(tmp_path: Path, data_dir: Path) -> None:
    torch.manual_seed(0)
    cfg = knn_config(data_dir)
    monitor = KnnMonitor(cfg, build_index(cfg), SINGLE_PROCESS, batch_size=64, dtype=None)
    single = monitor(build_pretrain_model(cfg).eval())
    mp.spawn(monitor_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path), str(data_dir)), nprocs=2)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == pytest.approx(single)


def test_pretraining_with_the_monitor_stopped_and_resumed_ends_with_the_weights_of_one_without(
    tmp_path: Path, data_dir: Path
) -> None:
    off, on = tmp_path / "off", tmp_path / "on"
    uninterrupted = start_module(
        "sogclr.pretrain", write_config(off, tiny_pretrain(data_dir, knn_every_epochs=None))
    )
    config = write_config(on, tiny_pretrain(data_dir, knn_every_epochs=1, knn_subset=BANK_SUBSET))
    interrupt_at(config, on, step=STEPS_PER_EPOCH + 3)  # after the first epoch's kNN
    run_module("sogclr.pretrain", config)
    wait_ok(uninterrupted)
    assert_same_training_state(off / "checkpoints" / "final.pt", on / "checkpoints" / "final.pt")
    records = [json.loads(line) for line in (on / "metrics.jsonl").read_text().splitlines()]
    knn_records = [r for r in records if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn_records] == [(STEPS_PER_EPOCH, 0), (2 * STEPS_PER_EPOCH, 1)]
    assert all(0 <= r["knn_top1"] <= r["knn_top5"] <= 100 for r in knn_records)
    assert not any(
        "knn_top1" in json.loads(line) for line in (off / "metrics.jsonl").read_text().splitlines()
    )
