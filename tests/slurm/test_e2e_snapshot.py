"""Jobs run the code they were submitted with: the checkout is broken after submission, the job is
preempted, and its resumed attempt completes with the frozen code (on the local SLURM cluster)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from launch import snapshot
from sogclr.contract.state import read_state
from testkit.e2e import job_ids, last_logged_step, sacct_state, wait_until
from testkit.slurm_cluster import SLURM_MODULE
from testkit.tiny import RUNWAY_EPOCHS, write_tiny_spec

pytestmark = SLURM_MODULE

BROKEN = "raise ImportError('edited after submission')\n"


def test_an_edit_after_submission_does_not_reach_the_resumed_attempt(slurm_cluster: Any, tmp_path: Path):
    checkout = tmp_path / "checkout"  # a copy of the project, importable instead of the real one
    for name, directory in snapshot.package_dirs().items():
        shutil.copytree(directory, checkout / name, ignore=shutil.ignore_patterns("__pycache__"))
    spec = write_tiny_spec(tmp_path, "frozen", pretrain={"epochs": RUNWAY_EPOCHS, "workers": 1})
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONSAFEPATH": "1"}
    subprocess.run([sys.executable, "-m", "launch.cli", str(spec)], env=env, cwd=tmp_path, check=True)
    run_dir = tmp_path / "runs" / "frozen" / "frozen"
    code = yaml.safe_load((run_dir / "config.yaml").read_text())["meta"]["code"]
    assert Path(code["path"]).parent == tmp_path / "runs" / "frozen" / "code"

    ids = job_ids(tmp_path, "frozen", "frozen")
    wait_until(lambda: last_logged_step(run_dir) >= 3, "the first attempt to train")
    for module in ("jobs/slurm.py", "jobs/attempt.py", "sogclr/pretrain.py", "sogclr/lincls.py"):
        (checkout / module).write_text(BROKEN)  # importing the checkout now fails
    slurm_cluster.preempt_node(slurm_cluster.node_of(ids["pretrain"]))

    wait_until(lambda: sacct_state(ids["pretrain"]) == "COMPLETED", "the resumed attempt to complete")
    wait_until((run_dir / "lincls" / "result.json").is_file, "the evaluation, also with the frozen code")
    state = read_state(run_dir / "state.json")
    assert "preempted" in [a["outcome"] for a in state["attempts"]]
    assert {a["code"] for a in state["attempts"]} == {code["snapshot"]}
    assert state["attempts"][-1]["outcome"] == "done" and state["attempts"][-1]["start_step"] > 0
