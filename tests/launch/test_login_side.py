"""The login side needs no training stack: every module of launch/ but local mode, every module of jobs/,
and sogclr's torch-free contract import with torch unimportable, and the commands that need no trainer
answer (tests/launch/test_report.py runs status and report the same way on a trained sweep)."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import jobs
import launch
import sogclr.contract
from testkit.login import TRAINING_STACK, login_command, without
from testkit.tiny import write_tiny_spec

IN_PROCESS_TRAINERS = {"launch.local"}  # `--local` runs the trainers inside the launcher's process


def login_modules() -> list[str]:
    names = []
    for package in (launch, jobs, sogclr.contract):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            names.append(module.name)
    return sorted(set(names) - IN_PROCESS_TRAINERS)


def test_every_login_side_module_imports_without_torch():
    modules = login_modules()
    assert {
        "launch.cli",
        "launch.inspect.status",
        "launch.inspect.report",
        "jobs.single",
        "sogclr.contract.rungs",
    } <= set(modules)
    body = "import importlib\n" + "".join(f"importlib.import_module({name!r})\n" for name in modules)
    result = without(TRAINING_STACK, body, cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr


def test_a_blocked_module_really_fails_to_import():
    """The check above can fail: the training library itself does not import under the same block."""
    result = without(TRAINING_STACK, "import sogclr.pretrain")
    assert result.returncode != 0 and "may not be imported on the login side" in result.stderr


def test_dry_run_status_and_report_of_an_unsubmitted_sweep_answer_without_torch(tmp_path: Path):
    spec = str(write_tiny_spec(tmp_path, "login", sweep={"product": {"gamma": [0.5, 0.9]}}))
    dry_run = login_command([spec, "--dry-run"])
    assert dry_run.returncode == 0, dry_run.stderr
    assert "gamma0.5" in dry_run.stdout and "gamma0.9" in dry_run.stdout
    status = login_command(["status", spec])
    assert status.returncode == 0, status.stderr
    assert "gamma0.5" in status.stdout
    report = login_command(["report", spec, "--format", "csv", "--no-figures"])
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[0].startswith("run,")
