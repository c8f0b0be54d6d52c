"""Local mode: a real run on this machine, preempted by `--preempt-after`, requeued, resumed, evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from launch import cli
from sogclr.state import read_state

TINY = {
    "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "time": "00:10:00", "signal_lead_s": 30},
    "pretrain": {
        "dataset": "digits", "image_size": 16, "arch": "resnet18", "projector_hidden_dim": 64,
        "projector_out_dim": 64, "epochs": 3, "batch_size": 64, "warmup_epochs": 0.5, "lr": 0.05,
        "workers": 0, "precision": "fp32", "log_every_steps": 1,
    },
    "lincls": {"epochs": 1, "batch_size": 64, "mode": "features", "workers": 0},
}  # fmt: skip


def write_spec(tmp_path: Path, **pretrain: object) -> Path:
    spec = {"name": "local", "output_root": str(tmp_path / "runs"), **TINY}
    spec["pretrain"] = {**TINY["pretrain"], **pretrain}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_local_run_is_preempted_resumes_and_is_evaluated(tmp_path: Path):
    assert cli.main([str(write_spec(tmp_path)), "--local", "--preempt-after", "20"]) == 0

    run_dir = tmp_path / "runs" / "local" / "local"
    state = read_state(run_dir / "state.json")
    first, second = state["attempts"]
    assert (first["outcome"], first["reason"]) == ("preempted", "signal SIGUSR2")
    assert 0 < first["end_step"] == second["start_step"] < second["end_step"] == state["total_steps"]
    assert state["status"] == "done" and state["requeues"] == 1
    assert 0 <= read_state(run_dir / "lincls" / "result.json")["top1"] <= 100

    # run again: everything is done, nothing is trained twice
    assert cli.main([str(write_spec(tmp_path)), "--local"]) == 0
    assert read_state(run_dir / "state.json")["attempts"] == state["attempts"]


def test_debug_mode_prints_the_traceback_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    spec = write_spec(tmp_path, dataset="folder", data_dir=str(empty))
    assert cli.main([str(spec), "--debug"]) == 1  # pytest's stdin is not a TTY: no debugger
    assert "Traceback" in capsys.readouterr().err
