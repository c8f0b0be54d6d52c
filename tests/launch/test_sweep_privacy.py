"""A sweep directory that another user could replace is refused (review 2026-12-05, N3). The owner's
project directory is group-writable (setgid, umask 002: a common cluster layout) and another user of
that group, created here with useradd, acts on it as the attack would: they cannot write into the 0750
sweep directory, but can rename it away and put their own in its place, whose `code/<digest>/jobs` the
owner's queued jobs would import. The checks are OpenSSH's for a key file's path (safe_path), with the
sticky bit as the exception that makes a shared writable directory safe.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from launch.manifest import private_directory
from launch.spec import SpecError

INTRUDER = "sogclr-intruder"


@pytest.fixture(scope="module")
def intruder() -> pwd.struct_passwd:
    """Another user, in the project group of the test's owner (root)."""
    if os.getuid() != 0:
        pytest.skip("acting as another user needs root (to create one with useradd and switch to it)")
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(INTRUDER)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", INTRUDER], check=True
    )
    return pwd.getpwnam(INTRUDER)


@pytest.fixture
def reachable() -> Iterator[Path]:
    """A directory the intruder can reach (pytest's own temporary directories are 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="sogclr-privacy-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def project_directory(parent: Path, intruder: pwd.struct_passwd, sticky: bool) -> Path:
    """The owner's output_root: group-writable and setgid, the intruder's group, sticky or not."""
    project = parent / "project"
    project.mkdir()
    os.chown(project, -1, intruder.pw_gid)
    project.chmod(0o2775 | (stat.S_ISVTX if sticky else 0))
    return project


def as_intruder(intruder: pwd.struct_passwd, script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script], user=intruder.pw_uid, group=intruder.pw_gid, extra_groups=[],
        capture_output=True, text=True,
    )  # fmt: skip


CODE = "{sweep}/code/0123456789abcdef/jobs"
REPLACE = (
    f"mv {{sweep}} {{sweep}}.old && mkdir -p {CODE} "
    f"&& echo 'import os; os.system(\"id\")' > {CODE}/single.py && chmod -R 750 {{sweep}}"
)


def test_a_sweep_directory_replaceable_through_a_group_writable_parent_is_refused(
    reachable: Path, intruder: pwd.struct_passwd
) -> None:
    project = project_directory(reachable, intruder, sticky=False)
    with pytest.raises(SpecError, match=rf"output_root: {project}, above the sweep directory, is writable by "
                       r"group or others without the sticky bit \(mode 2775\)"):  # fmt: skip
        private_directory(project / "sweep")

    # A sweep directory made there before (by an earlier version): the attack works...
    sweep = project / "old-sweep"
    sweep.mkdir(mode=0o750)
    assert as_intruder(intruder, f"touch {sweep}/x").returncode != 0  # no writing into it
    replaced = as_intruder(intruder, REPLACE.format(sweep=sweep))
    assert replaced.returncode == 0, replaced.stderr
    assert sweep.stat().st_uid == intruder.pw_uid
    # ...and the next submission refuses it
    with pytest.raises(SpecError, match=rf"output_root: {project}, above the sweep directory, is writable"):
        private_directory(sweep)


def test_a_sticky_parent_keeps_the_sweep_directory_its_owners_and_one_made_by_another_is_refused(
    reachable: Path, intruder: pwd.struct_passwd
) -> None:
    project = project_directory(reachable, intruder, sticky=True)
    sweep = project / "sweep"
    private_directory(sweep)
    refused = as_intruder(intruder, REPLACE.format(sweep=sweep))
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    assert sweep.stat().st_uid == os.getuid() and not (sweep / "code").exists()

    squatted = project / "squatted"  # made by the intruder before the owner's first submission
    assert as_intruder(intruder, f"mkdir -m 750 {squatted}").returncode == 0
    with pytest.raises(SpecError, match=rf"the sweep directory {squatted} belongs to uid {intruder.pw_uid}"):
        private_directory(squatted)
