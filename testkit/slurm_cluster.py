"""A real SLURM cluster for tests: the `slurm_cluster` fixture and the `slurm` marker.

Tests marked ``@pytest.mark.slurm`` run against the private two-node cluster of
``scripts/local-slurm`` (slurmctld, slurmd n1 and n2, slurmdbd with its own MariaDB), brought
up once per session and exported to the test process through ``SLURM_CONF``, so that sbatch,
srun, scancel, sacct and submitit work exactly as on a real cluster.

Register it from ``tests/conftest.py`` with either::

    pytest_plugins = ["testkit.slurm_cluster"]
    from testkit.slurm_cluster import *  # noqa: F401,F403   (or this)

The fixture returns a ``SlurmCluster``: ``conf``, ``env`` (what a client needs), ``nodes``,
``partition``, and helpers for end-to-end tests: ``run(cmd...)``, ``sbatch(script_text, args...)``,
``state(id)`` (the controller's view), ``accounted_state(id)`` and ``sacct(id, fields)`` (slurmdbd's
records), and ``wait_job(id, states, timeout)``, which polls with a timeout so a hang fails.

The cluster runs DEFAULT_PROFILE (SLURM's own defaults, with partition-priority preemption in REQUEUE
mode and no grace time). A test that needs another asks for it, applied live and undone afterwards::

    with slurm_cluster.profile(preempt="cancel", preempt_type="qos", grace_s=30):
        ...

and ``frozen_controller()`` stops slurmctld for a block (SIGSTOP, then SIGCONT), as a controller that
does not answer.

Where the cluster cannot run (not Linux, not root, SLURM missing and no apt-get), slurm tests
are skipped; with ``SOGCLR_REQUIRE_SLURM=1`` (CI) they fail instead, so that a machine that
silently lost its cluster cannot pass. A cluster that was already up before the session (say,
``scripts/local-slurm up`` by hand) is reused and left running afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest

__all__ = [
    "DEFAULT_PROFILE",
    "FINAL_STATES",
    "Profile",
    "SLURM_GROUP",
    "SLURM_MODULE",
    "SlurmCluster",
    "SlurmCommandError",
    "another_cluster",
    "cluster_of_its_own",
    "pytest_configure",
    "slurm_cluster",
    "_slurm_cluster_for_marked_tests",
]

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm"
REQUIRE_ENV = "SOGCLR_REQUIRE_SLURM"


@dataclass(frozen=True)
class Profile:
    """How the cluster preempts, binds CPUs and ends jobs: scripts/local-slurm's profile (see its usage).
    The defaults are SLURM's own, with partition-priority preemption in REQUEUE mode switched on (SLURM's
    default has none): GraceTime 0, KillWait 30, no kill_invalid_depend, no CPU binding."""

    preempt: Literal["requeue", "cancel"] = "requeue"
    preempt_type: Literal["partition", "qos"] = "partition"
    grace_s: int = 0
    kill_wait_s: int = 30
    kill_invalid_depend: bool = False
    cpu_bind: Literal["none", "cores"] = "none"
    message_timeout_s: int = 10
    max_array_size: int = 1001

    def env(self) -> dict[str, str]:
        """The script's environment variables for this profile."""
        return {
            f"SOGCLR_SLURM_{name.upper()}": str(int(value) if isinstance(value, bool) else value)
            for name, value in asdict(self).items()
        }


DEFAULT_PROFILE = Profile()
HIGH_PARTITION = "high"
# The marks of a module that needs the cluster, and of a module that has a few tests that do.
SLURM_GROUP = pytest.mark.xdist_group("slurm")
SLURM_MODULE = [pytest.mark.slurm, SLURM_GROUP]

# Job states after which SLURM will not run the job again by itself.
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

# Generous: the cluster shares two cores with whatever else the machine is doing.
UP_TIMEOUT_S = 600  # includes installing the Debian packages on a fresh machine
DOWN_TIMEOUT_S = 120
COMMAND_TIMEOUT_S = 60


class SlurmCommandError(subprocess.CalledProcessError):
    """A failed command whose message includes what it printed (CalledProcessError's does not)."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout: {self.stdout}\nstderr: {self.stderr}"


def _run(
    cmd: list[str],
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT_S,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, env=env, input=stdin_text, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise SlurmCommandError(result.returncode, cmd, result.stdout, result.stderr)
    return result


@dataclass
class SlurmCluster:
    """Handle on the running cluster, with helpers for submitting jobs and waiting on them."""

    conf: Path
    env: dict[str, str]  # what clients need in their environment (SLURM_CONF)
    nodes: tuple[str, ...]
    partition: str
    active: Profile = field(default=DEFAULT_PROFILE)  # the profile the cluster runs now

    @contextmanager
    def profile(self, **changes: object) -> Iterator[Profile]:
        """Run the block under DEFAULT_PROFILE with `changes` (`grace_s=30, preempt="cancel",
        preempt_type="qos"`), applied live (scontrol reconfigure, sacctmgr; slurmctld restarts for another
        PreemptType, jobs keep running); the default profile is back afterwards."""
        wanted = replace(DEFAULT_PROFILE, **changes)
        if self.active != DEFAULT_PROFILE:
            raise RuntimeError(f"profiles do not nest: {self.active} is active")
        self._apply(wanted)
        try:
            yield wanted
        finally:
            self._apply(DEFAULT_PROFILE)

    @contextmanager
    def frozen_controller(self) -> Iterator[None]:
        """slurmctld stopped (SIGSTOP) for the block, as a controller that does not answer at peak hours:
        clients time out after MessageTimeout. It is continued (SIGCONT) however the block ends."""
        pid = int((self.conf.parent.parent / "run" / "slurmctld.pid").read_text())
        os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def _apply(self, profile: Profile) -> None:
        _run([str(SCRIPT), "profile"], env={**os.environ, **profile.env()}, timeout=UP_TIMEOUT_S)
        self.active = profile

    def run(
        self, *cmd: str, check: bool = True, timeout: float = COMMAND_TIMEOUT_S, stdin_text: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (sbatch, scontrol, ...) against this cluster; text output captured.
        Raises SlurmCommandError on a non-zero exit status if ``check``."""
        return _run(
            list(cmd), env={**os.environ, **self.env}, check=check, timeout=timeout, stdin_text=stdin_text
        )

    def sbatch(self, script: str, *args: str) -> str:
        """Submit a batch script given as text (``#SBATCH`` lines work); return the job id."""
        out = self.run("sbatch", "--parsable", *args, stdin_text=script).stdout
        return out.strip().split(";")[0]

    def sacct(
        self,
        job_id: str | int,
        fields: Iterable[str] = ("JobID", "State", "ExitCode"),
        duplicates: bool = False,
    ) -> list[dict[str, str]]:
        """The job's accounting records (allocation only, no steps), one dict per record.

        With ``duplicates`` a requeued job shows every run (REQUEUED, ..., final state);
        without it only the latest, as on a real cluster.
        """
        fields = list(fields)
        cmd = ["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", ",".join(fields)]
        if duplicates:
            cmd.append("--duplicates")
        lines = self.run(*cmd).stdout.splitlines()
        return [dict(zip(fields, line.split("|"))) for line in lines if line]

    def state(self, job_id: str | int) -> str | None:
        """The job's current state: the controller's, or once the controller has forgotten the job
        (MinJobAge, 5 minutes) the accounting record's. None while neither knows the job."""
        live = self.run("squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T", check=False)
        if live.returncode == 0 and live.stdout.strip():
            return live.stdout.split()[0]
        return self.accounted_state(job_id)

    def accounted_state(self, job_id: str | int) -> str | None:
        """The state slurmdbd has recorded, which sacct and submitit read ('CANCELLED by 0' ->
        'CANCELLED'). It trails the controller's: RUNNING by up to several seconds."""
        records = self.sacct(job_id, ["State"])
        return records[-1]["State"].split()[0] if records else None

    def wait_job(
        self,
        job_id: str | int,
        states: str | Iterable[str] = FINAL_STATES,
        timeout: float = 60.0,
        poll_s: float = 0.2,
    ) -> str:
        """Poll until the job is in one of ``states``; return that state.

        A final state counts only once sacct records it too, so that sacct and submitit's
        ``job.state`` agree when this returns. Fails at once if the job reaches a final state
        that is not wanted (waiting for RUNNING on a job that FAILED), and with the controller's
        view of the job if ``timeout`` passes, so that a hang becomes a readable test failure.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in FINAL_STATES and state not in wanted:
                raise AssertionError(
                    f"job {job_id} ended {state} while waiting for {sorted(wanted)}\n{self._describe(job_id)}"
                )
            if state in wanted and (state not in FINAL_STATES or self.accounted_state(job_id) == state):
                return state
            time.sleep(poll_s)
        raise TimeoutError(
            f"job {job_id} still {state} after {timeout:.0f}s, waiting for "
            f"{sorted(wanted)}\n{self._describe(job_id)}"
        )

    def node_of(self, job_id: str | int) -> str:
        """The (first) node a running job runs on."""
        nodes = self.run("squeue", "-h", "-j", str(job_id), "-o", "%N").stdout.strip()
        return self.run("scontrol", "show", "hostnames", nodes).stdout.split()[0]

    def preempt_node(self, node: str) -> str:
        """Preempt whatever runs on `node` as a shared cluster does: a high-priority job (partition
        `high`, or QOS `high` under QOS preemption) that needs all of the node's CPUs. SLURM then sends
        the running jobs SIGTERM and, after the grace time, requeues or cancels them. Its id."""
        cpus = self.run("sinfo", "-h", "-n", node, "-o", "%c").stdout.split()[0]
        priority = ["--qos", "high"] if self.active.preempt_type == "qos" else ["-p", HIGH_PARTITION]
        return self.sbatch("#!/bin/sh\nsleep 1\n", *priority, "-w", node, "-c", cpus, "-o", "/dev/null")

    def lose_node(self, node: str) -> None:
        """A node failure: its slurmd and every process of its job steps killed at once. SLURM marks
        the node DOWN after SlurmdTimeout (20 s) and ends its jobs NODE_FAIL (then requeues them)."""
        self.run(str(SCRIPT), "lose-node", node)

    def node_state(self, node: str) -> str:
        """`idle`, `mixed`, `allocated`, `down*`, ... as sinfo says."""
        return self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").stdout.split()[0]

    def restore_node(self, node: str) -> None:
        self.run(str(SCRIPT), "restore-node", node)

    def _describe(self, job_id: str | int) -> str:
        return self.run("scontrol", "show", "job", str(job_id), check=False).stdout


# ---------------------------------------------------------------- the cluster's lifecycle


def _unavailable_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the local SLURM cluster needs Linux"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root (scripts/local-slurm runs its daemons as root)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM is not installed and there is no apt-get to install it"
    return None


def _script(
    command: str, timeout: float, settings: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **DEFAULT_PROFILE.env(), **(settings or {})}
    return _run([str(SCRIPT), command], env=env, check=False, timeout=timeout)


def _client_env(settings: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse the script's ``export NAME=VALUE`` lines: the script stays the one source of paths."""
    env = {}
    for line in _script("env", COMMAND_TIMEOUT_S, settings).stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


def _connect(settings: Mapping[str, str] | None = None) -> SlurmCluster:
    env = _client_env(settings)
    client_env = {**os.environ, **env}
    nodes = _run(["sinfo", "-h", "-N", "-o", "%N"], env=client_env).stdout.split()
    partitions = _run(["sinfo", "-h", "-o", "%P"], env=client_env).stdout.split()
    partition = next(name.rstrip("*") for name in partitions if name.endswith("*"))
    return SlurmCluster(
        conf=Path(env["SLURM_CONF"]), env=env, nodes=tuple(sorted(set(nodes))), partition=partition
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The local SLURM cluster, up for the whole session; SLURM_CONF is set in os.environ."""
    reason = _unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 forbids skipping slurm tests", pytrace=False)
        pytest.skip(reason)

    already_up = _script("status", COMMAND_TIMEOUT_S).returncode == 0
    up = _script("up", UP_TIMEOUT_S)
    if up.returncode != 0:
        pytest.fail(f"scripts/local-slurm up failed:\n{up.stderr}", pytrace=False)

    cluster = _connect()
    saved = {name: os.environ.get(name) for name in cluster.env}
    os.environ.update(cluster.env)
    try:
        yield cluster
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if not already_up:
            _script("down", DOWN_TIMEOUT_S)


# Clusters beside the session's, each on the five ports `offset` after the session's first (17010).
CLUSTER_PORT_OFFSETS = {"unanswered": 5, "faults": 10, "matrix": 15, "cancel": 20}


@contextmanager
def another_cluster(name: str, **settings: str) -> Iterator[SlurmCluster]:
    """A cluster beside the session's: DEFAULT_PROFILE with scripts/local-slurm's `settings`
    (SOGCLR_SLURM_*), in `<the session's directory>-<name>` on its five ports (CLUSTER_PORT_OFFSETS);
    up for the block (with SLURM_CONF and its settings in the environment, so that every client and
    every command of the script reaches it), down after. Its tests go in an xdist group of their own,
    beside the session's. Skipped (or failed in CI) as the session's fixture is."""
    reason = _unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_ENV}=1 forbids skipping slurm tests", pytrace=False)
        pytest.skip(reason)
    first_port = int(os.environ.get("SOGCLR_SLURM_PORT", "17010")) + CLUSTER_PORT_OFFSETS[name]
    settings = {
        "SOGCLR_SLURM_DIR": f"{os.environ.get('SOGCLR_SLURM_DIR', '/tmp/sogclr-slurm')}-{name}",
        "SOGCLR_SLURM_PORT": str(first_port),
        **settings,
    }
    up = _script("up", UP_TIMEOUT_S, settings)
    if up.returncode != 0:
        pytest.fail(f"scripts/local-slurm up ({name}) failed:\n{up.stderr}", pytrace=False)
    try:
        cluster = _connect(settings)
        with pytest.MonkeyPatch.context() as patch:
            for variable, value in {**settings, **cluster.env}.items():
                patch.setenv(variable, value)
            yield cluster
    finally:
        _script("down", DOWN_TIMEOUT_S, settings)


def cluster_of_its_own(name: str) -> tuple[list[pytest.MarkDecorator], Any]:
    """The marks and the `slurm_cluster` fixture of a long module that runs on a cluster of its own
    (`another_cluster(name)`), up for the module, in an xdist group of its own: beside the session's
    cluster, on another worker. Its tests ask for `slurm_cluster` as the others do:

        pytestmark, slurm_cluster = cluster_of_its_own("faults")
    """

    @pytest.fixture(scope="module", name="slurm_cluster")
    def module_cluster() -> Iterator[SlurmCluster]:
        with another_cluster(name) as cluster:
            yield cluster

    return [pytest.mark.slurm, pytest.mark.xdist_group(f"slurm-{name}")], module_cluster


@pytest.fixture(autouse=True)
def _slurm_cluster_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """Give every test marked ``slurm`` the cluster, whether or not it names the fixture."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slurm: runs against the local SLURM cluster (scripts/local-slurm), started once per session",
    )


@pytest.hookimpl(trylast=True)  # after pytest-xdist has put each test's group into its node id
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every `slurm` test must be in SLURM_GROUP: under pytest-xdist (`--dist loadgroup`) they then run
    on one worker, one cluster for all, while the other tests run beside them. A pytest with which the
    grouping does not take effect is refused: the workers would share and stop each other's cluster."""
    for item in items:
        if item.get_closest_marker("slurm") is not None and item.get_closest_marker("xdist_group") is None:
            raise pytest.UsageError(
                f"{item.nodeid}: marked slurm but not in SLURM_GROUP (testkit/slurm_cluster.py)"
            )
        group = item.get_closest_marker("xdist_group")
        if getattr(config.option, "loadgroup", False) and group is not None:
            if not item.nodeid.endswith(f"@{group.args[0]}"):
                raise pytest.UsageError(
                    f"pytest {pytest.__version__} with this pytest-xdist ignores --dist loadgroup; "
                    "install the versions setup.cfg's [test] extra asks for"
                )


_SKIPPED: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Note every skipped `slurm` test, whatever skipped it (the fixture, or the test itself); with
    xdist this runs where the reports are gathered, so the note reaches the session that finishes."""
    if report.skipped and "slurm" in report.keywords:
        _SKIPPED.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With SOGCLR_REQUIRE_SLURM=1 (CI), a skipped `slurm` test fails the run."""
    skipped = sorted(set(_SKIPPED))
    if skipped and os.environ.get(REQUIRE_ENV) == "1":
        print(f"\n{REQUIRE_ENV}=1 but {len(skipped)} slurm test(s) were skipped: {', '.join(skipped)}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
