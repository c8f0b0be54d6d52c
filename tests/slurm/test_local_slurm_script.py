"""`scripts/local-slurm up` as a new machine meets it: no host entries, and every failure explained.

Each test runs the real script (the same start-up path as `up` in CI) on a cluster of its own: its own
directory, ports and hosts file (SOGCLR_SLURM_HOSTS_FILE), so /etc/hosts and the session's cluster are
untouched. The hosts file starts as a new machine's: without n1 and n2.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.slurm_cluster import SCRIPT, SLURM_MODULE

pytestmark = SLURM_MODULE  # the session's cluster has installed the packages

PORT = 17110  # five ports from here; the session's cluster uses 17010-17014
NEW_MACHINE_HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost"  # no final newline either


@pytest.fixture
def sandbox() -> Iterator[Path]:
    """A directory every user can search: munged, which runs as its own user, lives below it."""
    path = Path(tempfile.mkdtemp(prefix="local-slurm-test."))
    path.chmod(0o755)
    (path / "hosts").write_text(NEW_MACHINE_HOSTS)
    try:
        yield path
    finally:
        script(path, "down")
        shutil.rmtree(path, ignore_errors=True)


def script(sandbox: Path, command: str, path_prefix: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SOGCLR_SLURM_DIR": str(sandbox / "cluster"),
        "SOGCLR_SLURM_PORT": str(PORT),
        "SOGCLR_SLURM_HOSTS_FILE": str(sandbox / "hosts"),
    }
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=300)


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one line that explains the failure; there must be exactly one."""
    assert result.returncode != 0, result.stderr
    assert "start failed" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("local-slurm: error")]
    return line


def test_up_adds_the_missing_host_entries_and_starts(sandbox: Path):
    # What another cluster's MariaDB holds in the shared temp directory while it starts: a starting
    # server deletes every '#sql*' file in its tmpdir, so each cluster's must be its own.
    others_table = Path(tempfile.gettempdir()) / f"#sql-temptable-{sandbox.name}"
    others_table.touch()
    try:
        up = script(sandbox, "up")
        assert others_table.exists(), "the cluster's MariaDB deleted another server's temporary table"
    finally:
        others_table.unlink(missing_ok=True)
    assert up.returncode == 0, up.stderr
    lines = (sandbox / "hosts").read_text().splitlines()
    assert lines == [*NEW_MACHINE_HOSTS.splitlines(), "127.0.0.1 n1", "127.0.0.1 n2"]
    assert script(sandbox, "status").returncode == 0

    again = script(sandbox, "up")
    assert again.returncode == 0 and "already up and healthy" in again.stderr
    assert (sandbox / "hosts").read_text().splitlines() == lines  # nothing added twice


def test_a_node_name_mapped_elsewhere_is_refused_before_anything_starts(sandbox: Path):
    (sandbox / "hosts").write_text("127.0.0.1 localhost\n10.1.2.3 n1\n")
    line = error_line(script(sandbox, "up"))
    assert "step 'hosts entries'" in line and "maps n1 to 10.1.2.3" in line
    assert not (sandbox / "cluster").exists()


def test_a_daemon_that_dies_at_start_is_named_with_its_last_log_line(sandbox: Path):
    shims = sandbox / "bin"
    shims.mkdir()
    shim = shims / "slurmctld"
    shim.write_text('#!/bin/sh\necho "slurmctld: fatal: broken on purpose" >&2\nexit 1\n')
    shim.chmod(0o755)

    line = error_line(script(sandbox, "up", path_prefix=shims))
    assert "step 'slurmctld'" in line and "broken on purpose" in line
    assert f"(logs: {sandbox / 'cluster' / 'log'})" in line
    # what was started before it is stopped again: no daemon holds the cluster's ports
    assert "not healthy" in script(sandbox, "status").stdout
    for port in range(PORT, PORT + 5):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still taken"


def test_a_taken_port_is_named(sandbox: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", PORT + 3))
        taken.listen()
        line = error_line(script(sandbox, "up"))
    assert "step 'port check'" in line and f"port {PORT + 3} is in use" in line


NOBODY = 65534


def test_another_users_directory_is_refused_even_empty(sandbox: Path):
    """Under a shared /tmp another user could make the cluster directory first, and then swap the
    slurm.conf that root daemons read: refused, never reused (review finding 31)."""
    (sandbox / "cluster").mkdir()
    os.chown(sandbox / "cluster", NOBODY, NOBODY)
    line = error_line(script(sandbox, "up"))
    assert "step 'cluster directory'" in line and "another user's" in line
    assert (sandbox / "cluster").stat().st_uid == NOBODY and not any((sandbox / "cluster").iterdir())


def test_another_users_lock_file_is_refused_and_left_as_it_is(sandbox: Path):
    lock = sandbox / "cluster.lock"
    lock.write_text("theirs\n")
    os.chown(lock, NOBODY, NOBODY)
    line = error_line(script(sandbox, "up"))
    assert "cluster.lock is not a file of ours" in line
    assert lock.read_text() == "theirs\n"  # not truncated
