"""What the kNN monitor costs on the quickstart (configs/quickstart.yaml, gamma 0.9): one pretraining run
with the monitor after every epoch, timed from its own metrics.jsonl, so that training and evaluation
alternate in one process and drifting machine load hits both alike.

Every step is logged (log_every_steps: 1), so an epoch's last step record closes its training, and its
epoch-end record (knn_top1) closes its evaluation: evaluation = that gap; training = from the previous
epoch's evaluation record to this epoch's last step (the epoch-end checkpoint and loader restart
included; the first epoch, which includes start-up, is left out). `knn_every_epochs: N` then costs
evaluation / (N x training), printed for N = --every (default: the field's default).

    python benchmarks/knn.py                 # 4 epochs
    python benchmarks/knn.py --epochs 6 --every 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from sogclr.contract.config import PretrainConfig, RunConfig
from sogclr.contract.layout import RunLayout
from sogclr.pretrain import train

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs of the timed run (at least 2)")
    parser.add_argument("--every", type=int, default=PretrainConfig().knn_every_epochs)
    return parser.parse_args()


def epoch_times(records: list[dict]) -> list[tuple[float, float]]:
    """(training s, evaluation s) of every epoch after the first, from a run's metrics.jsonl records."""
    last_step, evaluated = {}, {}
    for record in records:
        if "knn_top1" in record:
            evaluated[record["epoch"]] = record["time"]
        elif "loss" in record:
            last_step[record["epoch"]] = record["time"]
    return [
        (last_step[epoch] - evaluated[epoch - 1], evaluated[epoch] - last_step[epoch])
        for epoch in sorted(evaluated)
        if epoch > 0
    ]


def main() -> None:
    args = parse_args()
    pretrain = yaml.safe_load(QUICKSTART.read_text())["pretrain"]
    pretrain |= {"gamma": 0.9, "epochs": args.epochs, "knn_every_epochs": 1, "log_every_steps": 1}
    with tempfile.TemporaryDirectory() as tmp:
        config = RunConfig(run_dir=Path(tmp) / "run", pretrain=pretrain)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            assert train(config) == "done"
        lines = RunLayout(config.run_dir).pretrain.metrics.read_text().splitlines()
    times = epoch_times([json.loads(line) for line in lines])
    cfg = config.pretrain
    print(f"quickstart pretraining ({cfg.arch}, {cfg.image_size} px), kNN after every epoch")
    print("epoch   training s   kNN s   kNN / training")
    for epoch, (training, evaluation) in enumerate(times, start=1):
        print(f"{epoch:5d}   {training:10.2f}   {evaluation:5.2f}   {evaluation / training:14.3f}")
    ratio = statistics.median(evaluation / training for training, evaluation in times)
    print(f"median kNN / training epoch: {ratio:.3f}")
    print(f"knn_every_epochs: {args.every} costs {100 * ratio / args.every:.1f}% of training time")


if __name__ == "__main__":
    main()
