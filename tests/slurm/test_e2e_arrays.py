"""Job arrays end to end on the local SLURM cluster (preemptible, as shared clusters are:
testkit/slurm_cluster.py): every task stays a run of its own. A preempted task alone is requeued, under its
own id, and resumes from its saved step while the others run; each evaluation task starts after its own
pretraining task; a crashing task cancels its own evaluation only; cancel, status and --resubmit-failed
act on single runs of an array.

Pretraining tasks of the preempted sweep take both CPUs of a node, so that preempting the node of one task
hits that task alone. The preempted sweep trains for testkit/tiny.py's runway, the other one epoch: about
2.5 minutes for the first test alone on the idle 2-core machine, longer beside the rest of the suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from launch import cli
from sogclr.contract.layout import RunLayout
from sogclr.contract.state import read_state
from testkit.e2e import (
    TIMEOUT_S,
    attempts_chain,
    job_ids,
    last_logged_step,
    release,
    sacct_state,
    submit,
    wait_until,
)
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import RUNWAY_EPOCHS, write_tiny_spec, write_undecodable_dataset

# above wait_long's budget, so that a slow run fails with the name of what it waited for
pytestmark = [*SLURM_MODULE, pytest.mark.timeout(1800)]

HELD = {"additional": {"hold": True}}
GAMMAS = {"product": {"gamma": [0.3, 0.6, 0.9]}}
RUNS = ["gamma0.3", "gamma0.6", "gamma0.9"]


def wait_long(condition: Any, what: str) -> Any:
    """Five runs queue behind each other on the cluster's four CPUs: wait longer than for one run."""
    return wait_until(condition, what, timeout=2 * TIMEOUT_S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, slurm_cluster: Any) -> Path:
    return tmp_path_factory.mktemp("arrays")


@pytest.fixture(scope="module")
def preempted(workdir: Path, slurm_cluster: Any) -> dict[str, dict[str, str]]:
    """A 3-run array sweep; task 0 is preempted as soon as it trains. Its runs' job ids."""
    spec = write_tiny_spec(
        workdir,
        "array",
        slurm={"cpus_per_task": 2, **HELD},
        pretrain={"epochs": RUNWAY_EPOCHS},
        lincls={"slurm": {"cpus_per_task": 1}},
        sweep=GAMMAS,
    )
    assert submit(spec) == 0
    ids = {run: job_ids(workdir, "array", run) for run in RUNS}
    assert [ids[run]["pretrain"].partition("_")[2] for run in RUNS] == ["0", "1", "2"]  # one array
    release(slurm_cluster, workdir, "array")
    first = workdir / "runs" / "array" / RUNS[0]
    wait_until(lambda: last_logged_step(first) >= 3, "task 0 to take 3 steps")
    slurm_cluster.preempt_node(slurm_cluster.node_of(ids[RUNS[0]]["pretrain"]))
    return ids


@pytest.fixture(scope="module")
def crashed(workdir: Path, slurm_cluster: Any, preempted: Any) -> dict[str, dict[str, str]]:
    """A 2-run array sweep whose task 1 crashes (files that are no images); its runs' job ids."""
    junk = write_undecodable_dataset(workdir / "junk")
    sweep = {"product": {"dataset": ["digits", "folder"]}}
    spec = write_tiny_spec(workdir, "crash", pretrain={"data_dir": str(junk)}, slurm=HELD, sweep=sweep)
    assert submit(spec) == 0
    release(slurm_cluster, workdir, "crash")
    return {run: job_ids(workdir, "crash", run) for run in ("datasetdigits", "datasetfolder")}


@pytest.mark.usefixtures("crashed")  # submitted up front too: the two sweeps train side by side
def test_a_preempted_task_alone_is_requeued_and_resumes_from_its_saved_step(
    workdir: Path, preempted: dict[str, dict[str, str]], slurm_cluster: Any
):
    for run in RUNS:
        wait_long(
            (workdir / "runs" / "array" / run / "lincls" / "result.json").is_file, f"{run}'s evaluation"
        )
    states = {run: read_state(workdir / "runs" / "array" / run / "state.json") for run in RUNS}
    for run, state in states.items():
        attempts_chain(state)  # resumed where it saved
        assert {a["array_task"] for a in state["attempts"]} == {preempted[run]["pretrain"]}
        assert len({a["job_id"] for a in state["attempts"]}) == 1  # requeued under its own id
    stopped = states[RUNS[0]]["attempts"][0]
    assert stopped["outcome"] == "preempted" and "preempted by SLURM" in stopped["reason"]
    assert stopped["end_step"] >= 3 and states[RUNS[0]]["requeues"] >= 1
    for run in RUNS[1:]:
        assert [a["outcome"] for a in states[run]["attempts"]] == ["done"] and states[run]["requeues"] == 0
        records = slurm_cluster.sacct(preempted[run]["pretrain"], ["State"], duplicates=True)
        assert [record["State"] for record in records] == ["COMPLETED"]  # never requeued by SLURM either


def test_every_evaluation_task_starts_after_its_own_pretraining_task(
    workdir: Path, preempted: dict[str, dict[str, str]]
):
    for run in RUNS:
        layout = RunLayout(workdir / "runs" / "array" / run)
        # COMPLETED comes after the job layer has recorded the attempt (the result comes before)
        wait_long(lambda run=run: sacct_state(preempted[run]["lincls"]) == "COMPLETED", f"{run}'s evaluation")
        pretraining_ended = read_state(layout.pretrain.state)["attempts"][-1]["ended"]
        evaluation = read_state(layout.lincls.state)["attempts"][0]
        assert evaluation["started"] >= pretraining_ended  # ISO 8601 times compare as strings
        assert evaluation["array_task"] == preempted[run]["lincls"]
        assert 0 <= read_state(layout.lincls.result)["top1"] <= 100
        assert (layout.slurm_logs / f"{preempted[run]['pretrain']}_0_log.out").is_file()  # its own logs


def test_a_crashing_task_cancels_its_own_evaluation_only(workdir: Path, crashed: dict[str, dict[str, str]]):
    good, bad = crashed["datasetdigits"], crashed["datasetfolder"]
    wait_long(lambda: sacct_state(bad["pretrain"]) == "FAILED", "the crashing task to fail")
    wait_long(lambda: sacct_state(bad["lincls"]) == "CANCELLED", "its evaluation task to be cancelled")
    result = workdir / "runs" / "crash" / "datasetdigits" / "lincls" / "result.json"
    wait_long(result.is_file, "the other run's evaluation")
    wait_long(lambda: sacct_state(good["lincls"]) == "COMPLETED", "the other evaluation task to complete")
    assert sacct_state(good["pretrain"]) == "COMPLETED"
    state = read_state(workdir / "runs" / "crash" / "datasetfolder" / "state.json")
    assert [a["outcome"] for a in state["attempts"]] == ["failed"] and state["requeues"] == 0


def test_cancel_status_and_resubmission_act_on_single_runs_of_an_array(
    workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("COLUMNS", "200")
    spec = write_tiny_spec(workdir, "held", slurm=HELD, sweep=GAMMAS)
    assert submit(spec) == 0
    before = {run: job_ids(workdir, "held", run) for run in RUNS}
    try:
        assert cli.main(["cancel", str(spec), "--run", "gamma0.6"]) == 0  # still pending inside its array
        capsys.readouterr()
        assert cli.main(["status", str(spec)]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if "gamma" in line}
        assert rows["gamma0.6"].count("cancelled") == 2
        assert "cancelled" not in rows["gamma0.3"] and rows["gamma0.3"].count("pending") == 2

        assert submit(spec, "--resubmit-failed") == 0
        after = {run: job_ids(workdir, "held", run) for run in RUNS}
        assert {run: after[run] for run in ("gamma0.3", "gamma0.9")} == {
            run: before[run] for run in ("gamma0.3", "gamma0.9")
        }
        assert "_" not in after["gamma0.6"]["pretrain"]  # one run: a single job, not an array of one
    finally:
        assert cli.main(["cancel", str(spec)]) == 0
