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
import subprocess
from pathlib import Path
from typing import Any

import pytest

from launch import cli
from launch.spec import expand, load_spec
from sogclr.contract.config import dump_run_config, yardstick
from sogclr.contract.rungs import PROMOTED, Contender, RungRecords, decide
from sogclr.contract.state import read_state
from testkit.e2e import job_ids, sacct_state, submit, wait_until
from testkit.runs import record_rival
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_MODULE

RECIPE = {"epochs": 2, "batch_size": 128, "knn_every_epochs": 1, "knn_subset": 300}
RUNS = ["gamma0.3", "gamma0.6", "gamma0.9"]
# Stopped for good (promote: false): the job ends COMPLETED; test_a_paused_run_is_promoted_... has promotion.
SWEEP = {"product": {"gamma": [0.3, 0.6, 0.9]}, "prune": {"rungs": [1], "eta": 3, "promote": False}}


def test_a_pruned_sweep_as_an_array_ends_its_tasks_and_their_evaluations_and_resumes_one(
    tmp_path: Path, slurm_cluster: Any, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=SWEEP)
    sweep_dir = tmp_path / "runs" / "halving"
    record_rival(sweep_dir / "prune", 1, 100.0, expand(load_spec(spec))[0].config.pretrain)
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
    # node 0 cancels the evaluation before its own job ends: under load sacct shows COMPLETED a little later
    wait_until(lambda: sacct_state(single["pretrain"]) == "COMPLETED", "the single job to complete")
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
    sweep = {"prune": {"rungs": [1], "eta": 3}}  # promotion on: a sweep of one run, its rung final at once
    spec = write_tiny_spec(directory, "single", pretrain=RECIPE, sweep=sweep)
    (run,) = expand(load_spec(spec))
    record_rival(directory / "runs" / "single" / "prune", 1, 100.0, run.config.pretrain)
    assert submit(spec) == 0
    ids = job_ids(directory, "single", "single")
    assert "_" not in ids["pretrain"] and "_" not in ids["lincls"]
    return ids


@pytest.mark.timeout(1800)  # two runs one after the other, each evaluated: 13 min on a loaded machine
def test_a_paused_run_is_held_and_promoted_by_the_job_that_records_the_deciding_value(
    tmp_path: Path, slurm_cluster: Any
) -> None:
    """gamma0.3 reaches the rung first, behind a rival at 100 and a weak run at 0: 3 recorded, only the
    best continues, so it is paused: its job holds itself, its evaluation waits. gamma0.9 then arrives
    (gamma acts from the second epoch: the same kNN top-1 at epoch 1): 4 recorded, the top 2 continue,
    both runs tie at the threshold. gamma0.9 continues, and its job, when it ends, promotes gamma0.3:
    releases the held job, which resumes from the rung's checkpoint and is evaluated."""
    sweep = {"product": {"gamma": [0.3, 0.9]}, "prune": {"rungs": [1], "eta": 2}}
    spec = write_tiny_spec(tmp_path, "promote", pretrain=RECIPE, sweep=sweep)
    sweep_dir = tmp_path / "runs" / "promote"
    first, second = expand(load_spec(spec))
    records = RungRecords(sweep_dir / "prune", 1)
    record_rival(sweep_dir / "prune", 1, 100.0, first.config.pretrain)
    weak = Contender("weak", "weak", yardstick(first.config.pretrain, "knn_top1"))
    records.record(weak, "knn_top1", 0.0, step=11)
    second.run_dir.mkdir(parents=True)
    dump_run_config(second.config, second.files.config)  # in the sweep, not yet started: rung not final

    assert submit(spec, "--run", first.name) == 0
    paused = job_ids(tmp_path, "promote", first.name)
    wait_until(lambda: held(paused["pretrain"]), "the paused run's job held", poll_s=1)
    state = read_state(first.files.pretrain.state)
    assert state["status"] == "pruned" and [a["outcome"] for a in state["attempts"]] == ["pruned"]
    assert held(paused["pretrain"]) and pending(paused["lincls"])  # its evaluation still waits on it

    assert submit(spec, "--run", second.name) == 0
    decider = job_ids(tmp_path, "promote", second.name)
    result = first.files.lincls.result
    wait_until(result.is_file, "the promoted run's evaluation", timeout=1500, poll_s=2)

    assert job_ids(tmp_path, "promote", first.name) == paused  # the same jobs, released
    state = read_state(first.files.pretrain.state)
    assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["pruned", "done"]
    assert state["attempts"][1]["start_step"] == 11 and state["attempts"][1]["restart_count"] == 1
    verdict = records.verdict(first.name, state["training"])
    assert verdict["verdict"] == PROMOTED and verdict["by"] == second.name
    assert records.decision(second.name)["continue"] and verdict["keep"] == 2
    assert records.decision(first.name)["value"] == records.decision(second.name)["value"]
    wait_until(lambda: sacct_state(decider["lincls"]) == "COMPLETED", "the deciding run's evaluation")
    assert sacct_state(paused["pretrain"]) == "COMPLETED"


def held(job_id: str) -> bool:
    return "job_requeued_in_held_state" in scontrol(job_id)


def pending(job_id: str) -> bool:
    return "JobState=PENDING" in scontrol(job_id)


def scontrol(job_id: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
