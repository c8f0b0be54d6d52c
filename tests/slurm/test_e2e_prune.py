"""A pruned sweep end to end on the local SLURM cluster, as a job array (and a sweep of one run, as
single jobs, beside it): every task records its kNN accuracy at the rung beside its siblings', decides,
and is pruned; its job ends COMPLETED without a requeue, its evaluation is cancelled, `status` says
`pruned`, a resubmission leaves it alone, and `--resume-pruned` continues one run to the end and
evaluates it.

A run of the sweep recorded 100% at the rung before them (as an earlier run would have), so that every
task is pruned whatever order the tasks reach the rung in; test_prune.py has the rule between real
processes. One epoch to the rung and one after it, 11 steps each: 1.5 to 3 minutes (idle to loaded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from sogclr.contract.rungs import RungRecords, decide
from sogclr.contract.state import read_state
from testkit.e2e import job_ids, sacct_state, submit, wait_until
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_MODULE

RECIPE = {"epochs": 2, "batch_size": 128, "knn_every_epochs": 1, "knn_subset": 300}
RUNS = ["gamma0.3", "gamma0.6", "gamma0.9"]
SWEEP = {"product": {"gamma": [0.3, 0.6, 0.9]}, "prune": {"rungs": [1], "eta": 3}}


def test_a_pruned_sweep_as_an_array_ends_its_tasks_and_their_evaluations_and_resumes_one(
    tmp_path: Path, slurm_cluster: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=SWEEP)
    sweep_dir = tmp_path / "runs" / "halving"
    RungRecords(sweep_dir / "prune", 1).record("rival", "knn_top1", 100.0, step=11)
    assert submit(spec) == 0
    ids = {run: job_ids(tmp_path, "halving", run) for run in RUNS}
    assert len({ids[run]["pretrain"].partition("_")[0] for run in RUNS}) == 1  # one array
    single = single_jobs(tmp_path)  # beside them, on the cluster's fourth CPU

    for run in RUNS:
        wait_until(lambda run=run: sacct_state(ids[run]["lincls"]) == "CANCELLED", f"{run}'s evaluation")
        wait_until(lambda run=run: sacct_state(ids[run]["pretrain"]) == "COMPLETED", f"{run}'s pretraining")
    rung = RungRecords(sweep_dir / "prune", 1)
    seen = []
    for run in RUNS:
        state = read_state(sweep_dir / run / "state.json")
        (attempt,) = state["attempts"]  # never requeued
        assert state["status"] == "pruned" and attempt["outcome"] == "pruned"
        assert attempt["array_task"] == ids[run]["pretrain"] and state["step"] == 11
        decision = rung.decision(run)
        table = {row["run"]: row["value"] for row in decision["table"]}
        assert decide(run, table, maximize=True, eta=3)["continue"] is decision["continue"] is False
        assert state["pruned"]["decision"] == str(rung.decision_path(run))
        assert not (sweep_dir / run / "lincls" / "state.json").exists()
        seen.append(len(table))
    assert max(seen) == 4  # the last task to record saw its siblings' records and the rival's
    wait_until(lambda: sacct_state(single["lincls"]) == "CANCELLED", "the single job's evaluation")
    assert sacct_state(single["pretrain"]) == "COMPLETED"
    state = read_state(tmp_path / "runs" / "single" / "single" / "state.json")
    assert state["status"] == "pruned" and [a["outcome"] for a in state["attempts"]] == ["pruned"]
    capsys.readouterr()

    assert submit(spec) == 0 and submit(spec, "--resubmit-failed") == 0  # neither restarts them
    assert {run: job_ids(tmp_path, "halving", run) for run in RUNS} == ids
    actions = run_lines(capsys.readouterr().out)
    assert len(actions) == 6  # two submission tables
    assert all(line.endswith("nothing: pruned (--resume-pruned to continue it)") for line in actions)

    assert cli.main(["status", str(spec)]) == 0
    rows = [line.split() for line in run_lines(capsys.readouterr().out)]
    assert [row[3:5] for row in rows] == [["pruned", "pruned"]] * 3  # pretraining, linear eval

    assert submit(spec, "--resume-pruned", "gamma0.6") == 0
    resumed = job_ids(tmp_path, "halving", "gamma0.6")
    assert resumed != ids["gamma0.6"]
    result = sweep_dir / "gamma0.6" / "lincls" / "result.json"
    wait_until(result.is_file, "the continued run's evaluation")
    state = read_state(sweep_dir / "gamma0.6" / "state.json")
    assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["pruned", "done"]
    assert state["attempts"][1]["start_step"] == 11 and 0 <= json.loads(result.read_text())["top1"] <= 100
    for run in ("gamma0.3", "gamma0.9"):
        assert read_state(sweep_dir / run / "state.json")["status"] == "pruned"


def run_lines(out: str) -> list[str]:
    """The lines of the launcher's tables that are about a run of the sweep."""
    return [line for line in out.splitlines() if line.split()[:1] in ([run] for run in RUNS)]


def single_jobs(directory: Path) -> dict[str, str]:
    """A sweep of one run, so single jobs (pretraining, and its evaluation `afterok`), that a rival
    prunes at its rung; its job ids."""
    sweep = {"prune": {"rungs": [1], "eta": 3}}
    spec = write_tiny_spec(directory, "single", pretrain=RECIPE, sweep=sweep)
    RungRecords(directory / "runs" / "single" / "prune", 1).record("rival", "knn_top1", 100.0, step=11)
    assert submit(spec) == 0
    ids = job_ids(directory, "single", "single")
    assert "_" not in ids["pretrain"] and "_" not in ids["lincls"]
    return ids
