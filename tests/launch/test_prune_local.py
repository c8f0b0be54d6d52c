"""A pruned run through the launcher in local mode: its outcome, its evaluation that never starts, its
standing in `status`, a submission that leaves it alone, and `--resume-pruned`, which continues it to
the very weights of a run never pruned. The job layer's side: the outcome `pruned` ends the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.attempt import classify, finish_attempt
from jobs.slurm_client import UNKNOWN, SlurmJob
from jobs.stop import Budget, next_action
from launch import cli
from launch.cli import continued
from launch.manifest import record_job
from launch.plan import phases_to_submit
from launch.spec import expand, load_spec, resuming_pruned
from launch.standing import PRUNED, PhaseStanding, continued_after_pruning, phase_standing
from sogclr.contract.config import dump_run_config, yardstick
from sogclr.contract.rungs import PROMOTED, Contender, RungRecords
from sogclr.contract.state import read_state, update_state
from testkit.runs import assert_same_training_state, record_rival
from testkit.tiny import write_tiny_spec

STEPS = 11  # 1437 training digits // 128
RECIPE = {"epochs": 2, "batch_size": 128, "knn_every_epochs": 1, "knn_subset": 300}
HALVING = {"product": {"gamma": [0.9]}, "prune": {"rungs": [1], "eta": 2}}


def test_the_outcome_pruned_ends_the_job_and_is_recorded(tmp_path: Path) -> None:
    pruned = {"epoch": 1, "metric": "knn_top1", "value": 61.5, "threshold": 70.0, "decision": "d.json"}
    outcome = classify({"status": "pruned", "pruned": pruned}, returncode=0)
    assert outcome == ("pruned", "at epoch 1: knn_top1 61.5, threshold 70.0")
    attempt = {"job_id": 7, "start_step": 0, "end_step": 11, "outcome": "pruned", "reason": outcome[1]}
    assert next_action([attempt], Budget(max_requeues=20)) == ("end", None)  # never requeued

    state_path = tmp_path / "state.json"
    update_state(state_path, status="pruned", pruned=pruned, step=11)
    assert finish_attempt(state_path, attempt, Budget(max_requeues=20)) == "end"
    state = read_state(state_path)
    assert state["status"] == "pruned" and state["requeues"] == 0 and state["pruned"] == pruned


def test_only_resume_pruned_submits_a_pruned_run_again(tmp_path: Path) -> None:
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=HALVING)
    (run,) = expand(load_spec(spec))
    standing = {"pretrain": PhaseStanding("5", PRUNED), "lincls": PhaseStanding("6", PRUNED)}
    for resubmit_failed in (False, True):
        assert phases_to_submit(run, standing, resubmit_failed) == (
            [],
            "nothing: pruned (--resume-pruned to continue it)",
        )
    (resumed,) = resuming_pruned([run], [run.name])
    assert resumed.config.prune is None and run.config.prune is not None
    assert phases_to_submit(resumed, standing, False)[0] == ["pretrain", "lincls"]


def test_a_pruned_run_stands_pruned_until_a_job_of_its_continuation_is_queued(tmp_path: Path) -> None:
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=HALVING)
    (run,) = expand(load_spec(spec))
    manifest = {"runs": {}}
    record_job(manifest, run.name, "pretrain", "7", "t")
    record_job(manifest, run.name, "lincls", "8", "t")
    update_state(run.files.pretrain.state, status="pruned", pruned={"epoch": 1})
    ended = {"7": SlurmJob("completed"), "8": SlurmJob("cancelled")}  # as SLURM ends a pruned run's jobs
    for phase in ("pretrain", "lincls"):
        standing = phase_standing(run, phase, manifest, ended)
        assert standing.state == PRUNED and not standing.active
    resumed = {"7": SlurmJob("pending"), "8": SlurmJob("pending")}  # --resume-pruned submitted both
    assert all(phase_standing(run, phase, manifest, resumed).active for phase in ("pretrain", "lincls"))
    unknown = phase_standing(run, "pretrain", manifest, {"7": SlurmJob(UNKNOWN, reason="squeue failed")})
    assert unknown.state == UNKNOWN  # SLURM could not say whether a continuation runs: not `pruned`
    assert not continued_after_pruning(run)
    update_state(run.files.pretrain.state, status="running")
    assert continued_after_pruning(run)  # its next submission resumes it without pruning too
    (again,) = resuming_pruned([run], continued([run]))
    assert again.config.prune is None


def test_a_pruned_run_is_not_evaluated_shows_as_pruned_and_continues_to_the_unpruned_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=HALVING)
    sweep_dir = tmp_path / "runs" / "halving"
    # A better run of the sweep got to the rung first: no kNN accuracy beats 100.
    (run,) = expand(load_spec(spec))
    record_rival(sweep_dir / "prune", 1, 100.0, run.config.pretrain)
    assert cli.main([str(spec), "--local"]) == 0  # a pruned run is an outcome, not a failure

    run_dir = sweep_dir / "gamma0.9"
    state = read_state(run_dir / "state.json")
    assert state["status"] == "pruned" and state["pruned"]["epoch"] == 1 and state["step"] == STEPS
    assert [a["outcome"] for a in state["attempts"]] == ["pruned"]
    assert not (run_dir / "lincls").exists()  # its evaluation never started
    out = capsys.readouterr().out
    assert "gamma0.9 pretrain: pruned at step 11 -> end" in out
    assert any(line.startswith("│ gamma0.9 ") and " pruned " in line for line in out.splitlines())

    assert cli.main(["status", str(spec)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gamma0.9 ")]
    assert row.split()[3:5] == ["pruned", "pruned"]  # pretraining, linear eval
    assert " pruned at 1 " in " ".join(row.split()) + " "  # its rung is final (every run arrived): closed

    assert cli.main([str(spec), "--local"]) == 0  # a plain run leaves it alone
    assert read_state(run_dir / "state.json")["attempts"] == state["attempts"]

    assert cli.main([str(spec), "--local", "--resume-pruned", "gamma0.9"]) == 0
    state = read_state(run_dir / "state.json")
    assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["pruned", "done"]
    assert state["attempts"][1]["start_step"] == STEPS  # from the rung's checkpoint
    assert 0 <= read_state(run_dir / "lincls" / "result.json")["top1"] <= 100

    straight = write_tiny_spec(
        tmp_path, "straight", pretrain=RECIPE, lincls=None, sweep={"product": {"gamma": [0.9]}}
    )
    assert cli.main([str(straight), "--local"]) == 0
    assert_same_training_state(
        run_dir / "checkpoints" / "final.pt",
        tmp_path / "runs" / "straight" / "gamma0.9" / "checkpoints" / "final.pt",
    )


def test_a_paused_run_is_promoted_by_the_launcher_and_ends_with_the_weights_of_a_run_never_paused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_tiny_spec(tmp_path, "promote", pretrain=RECIPE, lincls=None, sweep=HALVING)
    sweep_dir = tmp_path / "runs" / "promote"
    (run,) = expand(load_spec(spec))
    records = sweep_dir / "prune"
    record_rival(records, 1, 100.0, run.config.pretrain)
    # Another run of the sweep, still training: the rung is not final, so the stopped run is paused.
    other = run.config.model_copy(update={"run_dir": sweep_dir / "elsewhere"})
    other.run_dir.mkdir(parents=True)
    dump_run_config(other, other.run_dir / "config.yaml")
    assert cli.main([str(spec), "--local"]) == 0
    state = read_state(run.files.pretrain.state)
    assert state["status"] == "pruned" and not RungRecords(records, 1).verdict(run.name, state["training"])
    capsys.readouterr()
    assert cli.main(["status", str(spec)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gamma0.9 ")]
    assert " paused at 1 " in " ".join(row.split()) + " "

    # Two weaker runs arrive at the rung: 4 recorded, the top 2 now takes in the paused run.
    settings = yardstick(run.config.pretrain, "knn_top1")
    for name in ("weak1", "weak2"):
        RungRecords(records, 1).record(Contender(name, name, settings), "knn_top1", 1.0, STEPS)
    assert cli.main([str(spec), "--local"]) == 0
    assert "gamma0.9: promoted, continued from its rung" in capsys.readouterr().out
    state = read_state(run.files.pretrain.state)
    assert state["status"] == "done" and [a["outcome"] for a in state["attempts"]] == ["pruned", "done"]
    assert state["attempts"][1]["start_step"] == STEPS  # from the rung's checkpoint
    verdict = RungRecords(records, 1).verdict(run.name, state["training"])
    assert verdict["verdict"] == PROMOTED and verdict["keep"] == 2
    assert verdict["threshold"] == state["pruned"]["value"]  # the second best of four: itself
    assert cli.main(["status", str(spec)]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gamma0.9 ")]
    assert " kept at 1 " in " ".join(row.split()) + " "

    straight = write_tiny_spec(
        tmp_path, "straight", pretrain=RECIPE, lincls=None, sweep={"product": {"gamma": [0.9]}}
    )
    assert cli.main([str(straight), "--local"]) == 0
    assert_same_training_state(
        run.files.pretrain.checkpoints / "final.pt",
        tmp_path / "runs" / "straight" / "gamma0.9" / "checkpoints" / "final.pt",
    )


def test_resume_pruned_refuses_a_run_that_is_not_pruned(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_tiny_spec(tmp_path, "halving", pretrain=RECIPE, sweep=HALVING)
    (run,) = expand(load_spec(spec))
    assert cli.main([str(spec), "--dry-run", "--resume-pruned", "gamma0.9"]) == 2
    assert "--resume-pruned gamma0.9: not pruned (its pretraining is not started)" in capsys.readouterr().err
    update_state(run.files.pretrain.state, status="done")
    assert cli.main([str(spec), "--local", "--resume-pruned", "gamma0.9"]) == 2
    err = capsys.readouterr().err
    assert "--resume-pruned gamma0.9: not pruned (its pretraining is done)" in err and err.count("\n") == 1
