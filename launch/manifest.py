"""A sweep's record of its SLURM jobs (`<sweep dir>/manifest.json`) and its lock.

The manifest maps run -> phase -> the submissions so far (job id, time, job name, cluster), the last one
current; launch/standing.py reads where each run stands from it.

Every sbatch is first recorded as pending, with a token that the job carries in its comment
(`--comment=sogclr:<token>`): when sbatch's reply is lost (the controller timed out after creating the
job, measured below), the job is found by its token instead of being submitted a second time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import socket
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jobs.slurm_client import SlurmError, jobs_with_names
from launch.spec import SpecError
from sogclr.contract.state import now, read_state, write_json_atomic

MANIFEST_FILE = "manifest.json"


LOCK_FILE = ".submit.lock"


# A job's comment carries the token of the submission that made it (see `find_submissions`).
TOKEN_PREFIX = "sogclr:"


# The sweep directories whose lock this process holds (flock is per open file: opening it again here
# would wait for ourselves).
_held: set[Path] = set()


@contextmanager
def sweep_lock(directory: Path) -> Iterator[None]:
    """Hold the sweep's lock: two submissions of one sweep run one after the other, never interleaved.
    Says who holds it while waiting. Everything written meanwhile (by this process, and by the jobs it
    submits, which inherit its umask) is closed to writes by group and others (`private_umask`)."""
    private_directory(directory)
    with private_umask(), open(directory / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the file closes
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another sogclr-submit"
            print(f"waiting for the sweep's lock {directory / LOCK_FILE}: held by {holder}", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:  # a file system mounted without locks (Lustre `noflock`: ENOSYS)
            raise SpecError(
                f"output_root: {directory} is on a file system without file locks ({err.strerror}); "
                "put output_root on one that has them"
            ) from None
        lock.truncate(0)
        lock.write(f"{socket.gethostname()}:{os.getpid()} since {now()}\n")
        lock.flush()
        _held.add(directory.resolve())
        try:
            yield
        finally:
            _held.discard(directory.resolve())


@contextmanager
def lock_if_free(directory: Path) -> Iterator[bool]:
    """The sweep's lock if this process holds it or can take it at once: True inside. False when
    another process holds it (a submission, a --local run: it closes what it finds itself) or the
    sweep cannot be written (a colleague's): the caller then writes nothing."""
    if directory.resolve() in _held:
        yield True
        return
    try:
        lock = open(directory / LOCK_FILE, "a")
    except OSError:  # read-only, or not ours
        yield False
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True


def private_directory(directory: Path) -> None:
    """Make the sweep directory (0750), or refuse it if group or others may write into it: they could
    replace the code, scripts and configs that its jobs run under the owner's account."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o750)
    mode = directory.stat().st_mode
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SpecError(
            f"output_root: the sweep directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(mode):o}): they could change what its jobs run; chmod go-w it"
        )


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and directories made meanwhile are not writable by group or others, nor readable by others."""
    previous = os.umask(0o027)
    os.umask(previous | 0o027)
    try:
        yield
    finally:
        os.umask(previous)


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_state(directory / MANIFEST_FILE) or {"runs": {}}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_json_atomic(directory / MANIFEST_FILE, manifest)


def record_job(
    manifest: dict[str, Any], run: str, phase: str, job_id: str, submitted: str, **about: str | None
) -> None:
    """Append a submission; `about` is what identifies the job later (`job_name`, `cluster`)."""
    manifest["runs"].setdefault(run, {}).setdefault(phase, []).append(
        {"job_id": job_id, "submitted": submitted, **about}
    )


def new_token() -> str:
    return secrets.token_hex(8)


def add_pending(manifest: dict[str, Any], token: str, phase: str, runs: list[str], **about: Any) -> None:
    """Note an sbatch about to be made: its token, its phase and runs (in array task order), and what
    identifies it (`job_name`, `cluster`, `array`, `submitted`); kept until its job id is known."""
    manifest.setdefault("pending", []).append({"token": token, "phase": phase, "runs": runs, **about})


def settle_pending(manifest: dict[str, Any], token: str, job_id: str | None) -> None:
    """The pending sbatch `token` made job `job_id` (an array: task i is its i-th run; `indices` when it
    has other task indices), or none: record its ids, and forget the pending entry."""
    pending = next(entry for entry in manifest.get("pending", []) if entry["token"] == token)
    manifest["pending"].remove(pending)
    if job_id is None:
        return
    about = {"job_name": pending.get("job_name"), "cluster": pending.get("cluster")}
    indices = pending.get("indices") or range(len(pending["runs"]))
    for index, run in zip(indices, pending["runs"], strict=True):
        task = f"{job_id}_{index}" if pending.get("array") else job_id
        record_job(manifest, run, pending["phase"], task, pending["submitted"], **about)


def find_submissions(pending: list[dict[str, Any]]) -> dict[str, str]:
    """token -> job id (an array's id) of the pending submissions SLURM has a job for: one squeue of our
    own jobs with those names, any state, matched by the token in their comment. SlurmError when squeue
    fails."""
    jobs = jobs_with_names([entry["job_name"] for entry in pending])
    return {
        comment.removeprefix(TOKEN_PREFIX): job_id
        for job_id, comment in jobs
        if comment.startswith(TOKEN_PREFIX)
    }


def resolve_pending(manifest: dict[str, Any]) -> dict[str, str]:
    """Settle the sbatch calls whose reply was lost (see `settle_pending`): a job SLURM has is recorded,
    one it has not was never made (or has ended and been forgotten: it runs no more either way). Returns
    {token: why} for those SLURM could not be asked about; they stay pending, and their runs `unknown`."""
    pending = manifest.get("pending", [])
    if not pending:
        return {}
    try:
        found = find_submissions(pending)
    except SlurmError as err:
        return {entry["token"]: str(err) for entry in pending}
    for entry in list(pending):
        settle_pending(manifest, entry["token"], found.get(entry["token"]))
    return {}


def current_submission(manifest: dict[str, Any], run: str, phase: str) -> dict[str, Any] | None:
    submissions = manifest["runs"].get(run, {}).get(phase, [])
    return submissions[-1] if submissions else None


def current_job(manifest: dict[str, Any], run: str, phase: str) -> str | None:
    submission = current_submission(manifest, run, phase)
    return submission["job_id"] if submission else None
