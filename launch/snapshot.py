"""The code a sweep's jobs run: frozen at submission, so that editing or pulling the checkout while jobs
wait in the queue (or between requeues) changes nothing they run.

`freeze` copies the project's packages as they are importable now (uncommitted changes included) into
`<sweep dir>/code/<digest>/`, content-addressed: unchanged code is stored once, however often a sweep is
submitted. Jobs put that directory first on PYTHONPATH (the sbatch script exports it, after the user's
setup lines), so every attempt imports the frozen code, and the job task checks that it does. The snapshot's
`snapshot.json` says what it is: its digest and the git commit and dirty flag of the checkout it came
from (asked of the code's own location, not of the current directory).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.code import SNAPSHOT_MARKER as MARKER
from jobs.code import SUBMITTED_CODE_ENV

PACKAGES = ("sogclr", "jobs", "launch")
CODE_DIR = "code"
_SKIPPED = ("__pycache__",)


@dataclass(frozen=True)
class Snapshot:
    """Frozen code: where it lives, its content digest, and the checkout it came from."""

    path: Path
    digest: str
    git: dict[str, Any] | None

    def record(self) -> dict[str, Any]:
        """What config.yaml's `meta.code` says about it."""
        return {"snapshot": self.digest, "path": str(self.path), "git": self.git}

    def setup_line(self) -> str:
        """The sbatch line that makes every process of the job import this code: first on PYTHONPATH,
        and no current directory in front of it (jobs start where `sbatch` ran, often the checkout).
        It also names the snapshot, which the job checks it runs (jobs/code.py)."""
        path = shlex.quote(str(self.path))
        return (
            f"export {SUBMITTED_CODE_ENV}={shlex.quote(self.digest)} PYTHONSAFEPATH=1 "
            f'PYTHONPATH={path}"${{PYTHONPATH:+:$PYTHONPATH}}"'
        )


def package_dirs() -> dict[str, Path]:
    """Each project package's directory, as Python imports it now."""
    return {name: Path(importlib.import_module(name).__file__).parent for name in PACKAGES}


def source_files(directories: dict[str, Path]) -> dict[str, bytes]:
    """{path inside the snapshot: content} for every file of the packages, sorted, caches left out.
    Each file is read once: what is hashed is what is written, even if the checkout is saved meanwhile."""
    files = {}
    for name, directory in directories.items():
        for path in directory.rglob("*"):
            if path.is_file() and not any(part in _SKIPPED for part in path.parts) and path.suffix != ".pyc":
                files[f"{name}/{path.relative_to(directory).as_posix()}"] = path.read_bytes()
    return dict(sorted(files.items()))


def digest_of(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name, content in files.items():
        h.update(f"{name}\0{len(content)}\0".encode())
        h.update(content)
    return h.hexdigest()[:16]


def freeze(sweep_dir: Path) -> Snapshot:
    """Freeze the importable project code under `<sweep_dir>/code/<digest>/` (once per content)."""
    directories = package_dirs()
    files = source_files(directories)
    digest = digest_of(files)
    target = sweep_dir / CODE_DIR / digest
    if (target / MARKER).is_file():
        return Snapshot(target, digest, json.loads((target / MARKER).read_text())["git"])
    git = git_provenance(directories["sogclr"])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=target.parent))
    try:
        for name, content in files.items():
            destination = staging / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(content)
        (staging / MARKER).write_text(json.dumps({"digest": digest, "git": git}, indent=2))
        os.replace(staging, target)  # whole or not at all; a concurrent freeze of the same code wins too
    except OSError:
        if not (target / MARKER).is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Snapshot(target, digest, git)


def live_code() -> dict[str, Any]:
    """`meta.code` of a run that runs the checkout as it is (local mode, or --no-snapshot)."""
    return {"snapshot": None, "path": None, "git": git_provenance(package_dirs()["sogclr"])}


def git_provenance(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout that holds `directory`; None outside one."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True)

    commit = git("rev-parse", "HEAD")
    if commit.returncode:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(git("status", "--porcelain").stdout.strip())}
