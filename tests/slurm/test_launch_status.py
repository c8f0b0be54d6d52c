"""`status` warnings: a run whose checkpoint takes longer than the time it gets to save after a signal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from jobs.slurm_client import partition_grace_times
from launch.inspect.status import last_record, save_time_warnings
from launch.spec import expand, load_spec
from sogclr.contract.state import read_state, update_state
from testkit.slurm_cluster import SLURM_GROUP
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_GROUP  # some of its tests need the cluster: the same worker as the others


@pytest.mark.parametrize(
    "last_save_s, lead, grace, expected",
    [
        (5.0, 60, 30, []),
        (45.0, 60, 30, ["GraceTime (30 s)"]),
        (90.0, 60, 30, ["signal_lead_s (60 s)", "GraceTime (30 s)"]),
        (90.0, 60, None, ["signal_lead_s (60 s)"]),  # a partition that does not preempt
    ],
)
def test_a_save_longer_than_the_lead_or_grace_time_is_warned(
    tmp_path: Path, last_save_s: float, lead: int, grace: int | None, expected: list[str]
):
    (run,) = expand(load_spec(write_tiny_spec(tmp_path, "w", slurm={"signal_lead_s": lead})))
    update_state(run.run_dir / "state.json", status="running", last_save_s=last_save_s)
    took = read_state(run.files.pretrain.state)["last_save_s"]  # what status reads
    warnings = save_time_warnings(run, took, {} if grace is None else {None: grace})
    assert len(warnings) == len(expected)
    for warning, words in zip(warnings, expected, strict=True):
        assert warning.startswith("w: its last save took") and words in warning


def test_a_run_that_never_saved_is_not_warned(tmp_path: Path):
    (run,) = expand(load_spec(write_tiny_spec(tmp_path, "w")))
    assert save_time_warnings(run, read_state(run.files.pretrain.state).get("last_save_s"), {None: 0}) == []


@pytest.mark.slurm
def test_grace_times_are_read_from_the_controller(slurm_cluster):
    # `low` (default) preempts with GraceTime=30 in this profile, `high` does not preempt
    with slurm_cluster.profile(grace_s=30):
        assert partition_grace_times() == {"low": 30, None: 30}


def test_the_last_loss_is_found_behind_an_epoch_end_evaluation(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 21, "loss": 0.7}, {"step": 22, "loss": 0.6}, {"step": 22, "global_objective": 3.1}]
    metrics.write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 23, "lo'
    )  # one being written
    assert last_record(metrics, having="loss") == {"step": 22, "loss": 0.6}
    assert last_record(tmp_path / "none.jsonl", having="loss") is None


def test_the_last_knn_record_is_found_far_behind_the_last_step(tmp_path: Path):
    metrics = tmp_path / "metrics.jsonl"
    knn = {"step": 22, "epoch": 0, "knn_top1": 71.5, "knn_top5": 95.0}
    named = {"step": 22, "rung_metric": "knn_top1"}  # the name as a value: parsed, and passed over
    losses = [{"step": step, "loss": 0.5, "padding": "x" * 100} for step in range(23, 2023)]  # ~250 kB
    metrics.write_text("".join(json.dumps(r) + "\n" for r in [knn, named, *losses]))
    for block in (65536, 1000, 7):  # lines cut anywhere by the blocks
        assert last_record(metrics, having="knn_top1", block=block) == knn
        assert last_record(metrics, having="loss", block=block) == losses[-1]
    assert last_record(metrics, having="global_objective") is None
