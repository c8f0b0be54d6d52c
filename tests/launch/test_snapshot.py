"""The code snapshot: content-addressed, stored once, complete, and what a job imports first."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import snapshot
from launch.scripts import job_script
from launch.snapshot import PACKAGES, freeze
from launch.spec import expand, load_spec
from testkit.tiny import write_tiny_spec


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's packages, standing in for the importable code (so tests may edit it)."""
    source = tmp_path / "checkout"
    for name, directory in snapshot.package_dirs().items():
        shutil.copytree(directory, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    (source / "sogclr" / "__pycache__").mkdir()
    (source / "sogclr" / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    monkeypatch.setattr(snapshot, "package_dirs", lambda: {name: source / name for name in PACKAGES})
    return source


def test_the_same_code_is_stored_once(tmp_path: Path, checkout: Path):
    first, second = freeze(tmp_path / "sweep"), freeze(tmp_path / "sweep")
    assert first == second and [p.name for p in (tmp_path / "sweep" / "code").iterdir()] == [first.digest]
    frozen = first.path / "sogclr" / "training" / "loop.py"
    assert frozen.read_bytes() == (checkout / "sogclr" / "training" / "loop.py").read_bytes()
    assert not (first.path / "sogclr" / "__pycache__").exists()
    assert json.loads((first.path / "snapshot.json").read_text())["digest"] == first.digest


def test_an_edit_makes_a_new_snapshot_and_leaves_the_old_one(tmp_path: Path, checkout: Path):
    before = freeze(tmp_path / "sweep")
    (checkout / "jobs" / "slurm.py").write_text("raise ImportError('edited after submission')\n")
    after = freeze(tmp_path / "sweep")
    assert after.digest != before.digest
    assert b"edited after submission" not in (before.path / "jobs" / "slurm.py").read_bytes()


def test_a_job_shell_imports_the_snapshot_first(tmp_path: Path, checkout: Path):
    frozen = freeze(tmp_path / "sweep")
    (checkout / "jobs" / "code.py").write_text("raise ImportError('edited after submission')\n")
    probe = f"{sys.executable} -c 'from jobs.code import running_code; print(running_code())'"
    out = subprocess.run(
        ["bash", "-c", f"{frozen.setup_line()}; {probe}"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(checkout)},  # the edited checkout is importable too
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == frozen.digest


def test_setup_lines_cannot_put_other_code_first_and_a_job_refuses_code_it_was_not_submitted_with(
    tmp_path: Path, checkout: Path
):
    frozen = freeze(tmp_path / "sweep")
    user_line = f"export PYTHONPATH={checkout}:$PYTHONPATH"  # carried over from an old sbatch script
    spec = write_tiny_spec(tmp_path, "s", slurm={"setup": [user_line]})
    (run,) = expand(load_spec(spec))
    script = job_script(run, "pretrain", None, frozen).splitlines()
    assert script.index(user_line) < script.index(frozen.setup_line())  # the snapshot is exported last
    check = f"{sys.executable} -c 'from jobs.code import check_submitted_code; check_submitted_code()'"

    def job(*lines: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ""}
        return subprocess.run(
            ["bash", "-c", "; ".join([*lines, check])], env=env, capture_output=True, text=True
        )

    assert job(user_line, frozen.setup_line()).returncode == 0
    bypassed = job(frozen.setup_line(), user_line)  # as before: the live checkout first
    assert bypassed.returncode == 1
    assert f"submitted with code snapshot {frozen.digest} but imports live" in bypassed.stderr
