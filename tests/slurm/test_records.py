"""The run records every command reads: writers that share a process id never share a temporary file
(ranks on different nodes of a shared file system; here two threads of one process), a damaged
state.json is reported, not a crash; `status` and `report` close an attempt that SLURM ended only under
the sweep's lock (once, however many run at once), and still report a sweep they cannot write (a
colleague's: here a read-only bind mount in a private mount namespace).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from jobs.attempt import begin_attempt
from launch import cli
from launch.manifest import sweep_lock
from sogclr.contract.state import read_state, update_state, write_json_atomic
from testkit.e2e import job_ids
from testkit.slurm_cluster import SLURM_GROUP
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_GROUP  # some of its tests need the cluster: the same worker as the others


def test_writers_with_one_process_id_never_share_a_temporary_file(tmp_path: Path) -> None:
    path, errors = tmp_path / "state.json", []

    def writer(tag: int) -> None:
        for i in range(50):
            try:
                write_json_atomic(path, {"tag": tag, "i": i, "padding": "x" * 100_000})
            except OSError as error:  # before: the other's replace took our temporary file
                errors.append(error)

    threads = [threading.Thread(target=writer, args=(tag,)) for tag in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_state(path)["i"] == 49
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left


def test_a_damaged_state_reads_as_corrupt_and_the_next_record_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"status": "running", "attempts": [{"job')  # cut short
    state = read_state(path)
    assert state["status"] == "corrupt" and "not valid JSON" in state["error"]
    update_state(path, status="running", step=3)
    assert read_state(path)["step"] == 3
    assert (tmp_path / "state.json.corrupt").read_text().startswith('{"status": "running"')


def test_status_and_report_show_a_damaged_run_record(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_tiny_spec(tmp_path, "damaged")
    run_dir = tmp_path / "runs" / "damaged" / "damaged"
    run_dir.mkdir(parents=True)
    (run_dir / "state.json").write_text("\0\0\0")
    assert cli.main(["status", str(spec)]) == 0
    assert "corrupt (run dir)" not in capsys.readouterr().out  # never submitted: not asked of the run dir
    assert cli.main(["report", str(spec), "--no-figures"]) == 0


def sogclr_submit(*args: str, read_only: Path | None = None) -> subprocess.CompletedProcess:
    """`sogclr-submit ARGS` in a child process; with `read_only`, that directory is mounted read-only
    for it alone (a private mount namespace: nothing changes for anyone else)."""
    command = [sys.executable, "-m", "launch.cli", *args]
    if read_only is not None:
        mount = f'mount --bind -o ro {read_only} {read_only} && exec "$@"'
        command = ["unshare", "--mount", "sh", "-c", mount, "sh", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.mark.slurm
def test_an_attempt_slurm_ended_is_closed_once_under_the_lock_and_a_read_only_sweep_is_reported(
    tmp_path: Path, slurm_cluster: Any
) -> None:
    spec = write_tiny_spec(tmp_path, "closing", slurm={"additional": {"hold": True}})
    assert cli.main([str(spec)]) == 0
    jobs = job_ids(tmp_path, "closing", "closing")
    state_path = tmp_path / "runs" / "closing" / "closing" / "state.json"
    begin_attempt(state_path, {"job_id": jobs["pretrain"]})  # as its job task does; then killed unheard
    subprocess.run(["scancel", *jobs.values()], check=True)
    sweep = tmp_path / "runs" / "closing"

    read_only = sogclr_submit("status", str(spec), read_only=sweep)
    assert read_only.returncode == 0, read_only.stderr
    assert "cancelled" in read_only.stdout
    report = sogclr_submit("report", str(spec), "--no-figures", read_only=sweep)
    assert report.returncode == 0, report.stderr
    assert read_state(state_path)["current_attempt"] is not None  # nothing written

    with sweep_lock(sweep):  # a submission or --local holds it: status neither waits nor writes
        busy = sogclr_submit("status", str(spec))
    assert busy.returncode == 0, busy.stderr
    assert read_state(state_path)["current_attempt"] is not None

    both = [subprocess.Popen([sys.executable, "-m", "launch.cli", "status", str(spec)]) for _ in range(2)]
    assert [process.wait(timeout=300) for process in both] == [0, 0]
    state = read_state(state_path)
    assert state["current_attempt"] is None and state["status"] == "cancelled"
    assert [attempt["outcome"] for attempt in state["attempts"]] == ["cancelled"]
    assert json.loads(state_path.read_text()) == state and os.access(state_path, os.R_OK)
