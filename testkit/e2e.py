"""Helpers of the end-to-end tests on the local SLURM cluster: submit, find job ids, wait, compare runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from launch import cli
from launch.manifest import read_manifest

TIMEOUT_S = 600


def submit(spec: Path, *args: str) -> int:
    return cli.main([str(spec), *args])


def job_ids(spec_dir: Path, name: str, run: str) -> dict[str, str]:
    runs = read_manifest(spec_dir / "runs" / name)["runs"]
    return {phase: submissions[-1]["job_id"] for phase, submissions in runs[run].items()}


def release(cluster: Any, spec_dir: Path, name: str) -> None:
    """Release every held job (or array task) of every run of sweep `name`."""
    runs = read_manifest(spec_dir / "runs" / name)["runs"]
    cluster.run(
        "scontrol", "release", *(job_ids(spec_dir, name, run)[phase] for run in runs for phase in runs[run])
    )


def sacct_state(job_id: str) -> str:
    """The job's state in accounting. An array task that SLURM cancelled while still part of its array's
    pending remainder has no record of its own (measured on 22.05: `sacct -j A_2` answers nothing, the
    task is in the record `A_[0-2]`): then the remainder's state."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id.partition("_")[0]],
        capture_output=True,
        text=True,
    ).stdout
    records = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
    if job_id in records or "_" not in job_id:
        return records.get(job_id, "").split(" ")[0]
    array, _, index = job_id.partition("_")
    for record, state in records.items():
        if (found := re.fullmatch(rf"{array}_\[(.*)\]", record)) and int(index) in _indices(found.group(1)):
            return state.split(" ")[0]
    return ""


def _indices(ranges: str) -> set[int]:
    """`0-2,5` -> {0, 1, 2, 5} (an array record's task ranges; `%N` limits dropped)."""
    found: set[int] = set()
    for part in ranges.split("%")[0].split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def wait_until(
    condition: Callable[[], Any], what: str, timeout: float = TIMEOUT_S, poll_s: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return yaml.safe_load(lines[-1])["step"] if lines else 0


def final_state(run_dir: Path) -> dict[str, Any]:
    """Everything that must match an uninterrupted run: weights, optimizer state and the loss's u."""
    payload = torch.load(run_dir / "checkpoints" / "final.pt", map_location="cpu", weights_only=False)
    return {key: payload[key] for key in ("model", "optimizer", "criterion")}


def assert_identical(ours: Any, theirs: Any, where: str = "") -> None:
    """Bit-identical nested state dicts (tensors compared exactly)."""
    if isinstance(ours, torch.Tensor):
        assert torch.equal(ours, theirs), f"{where} differs"
    elif isinstance(ours, dict):
        assert ours.keys() == theirs.keys(), f"{where}: keys differ"
        for key in ours:
            assert_identical(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list | tuple):
        assert len(ours) == len(theirs), f"{where}: lengths differ"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_identical(a, b, f"{where}[{i}]")
    else:
        assert ours == theirs, f"{where}: {ours!r} != {theirs!r}"


def start_uninterrupted_reference(run_dir: Path, reference_dir: Path) -> subprocess.Popen:
    """The same config run directly (no torchrun, no SLURM), without interruption, in `reference_dir`."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_dir"] = str(reference_dir)
    reference_dir.mkdir()
    path = reference_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [sys.executable, "-m", "sogclr.pretrain", "--config", str(path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def trainer_pids(run_dir: Path, module: str = "sogclr.pretrain") -> list[int]:
    """The training processes (torchrun's workers, not the agent nor loader workers) of a run, oldest
    first (a loader worker orphaned by a killed trainer may be adopted by the agent for a moment)."""
    config = f"{run_dir / 'config.yaml'}"
    found = []
    for pid in (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()):
        command = _cmdline(pid)
        if (
            "-m" in command
            and module in command
            and config in command
            and "torch.distributed.run" not in command
        ):
            parent = _cmdline(_parent(pid))
            if "torch.distributed.run" in parent:
                found.append(pid)
    return sorted(found, key=_start_time)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def _start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def attempts_chain(state: dict[str, Any]) -> None:
    """Every attempt resumed where the one before it saved: nothing redone beyond the last checkpoint."""
    attempts = state["attempts"]
    for before, after in zip(attempts, attempts[1:]):
        assert after["start_step"] == before["end_step"], (before, after)
    assert attempts[-1]["outcome"] == "done" and state["status"] == "done"
