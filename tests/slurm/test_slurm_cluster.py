"""Smoke tests of the local SLURM cluster: the behaviours the launcher and the job layer rely on.

Each test asserts something SLURM itself does (requeue keeps the job id, USR2 reaches the job
steps, afterok survives a requeue, ...), so a cluster that only looks alive cannot pass.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cloudpickle
import submitit

from testkit.slurm_cluster import SLURM_MODULE

pytestmark = SLURM_MODULE

# Jobs unpickle the functions below by value, so they need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 60.0


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def auto_executor(folder: Path, **parameters) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, **parameters)
    return executor


def describe_task() -> dict:
    """Runs inside the job: what submitit and SLURM tell one task about its place."""
    env = submitit.JobEnvironment()
    return {
        "job_id": env.job_id,
        "global_rank": env.global_rank,
        "num_tasks": env.num_tasks,
        "num_nodes": env.num_nodes,
        "node": os.environ["SLURMD_NODENAME"],
        "hostnames": env.hostnames,
    }


def test_submitit_job_returns_its_result(slurm_cluster, tmp_path):
    # mem_gb as configs/quickstart.yaml asks: the nodes must declare enough memory to accept it.
    job = auto_executor(tmp_path, mem_gb=4).submit(describe_task)

    assert slurm_cluster.wait_job(job.job_id, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    result = job.result()
    assert result["job_id"] == job.job_id
    assert result["num_tasks"] == 1
    assert result["node"] in slurm_cluster.nodes
    assert job.state == "COMPLETED"  # submitit reads it from sacct, i.e. from slurmdbd


def test_two_node_job_sees_both_nodes_and_ranks(slurm_cluster, tmp_path):
    executor = auto_executor(tmp_path, nodes=2, tasks_per_node=1)
    job = executor.submit(describe_task)

    assert slurm_cluster.wait_job(job.job_id, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    tasks = job.results()
    assert sorted(task["global_rank"] for task in tasks) == [0, 1]
    assert sorted(task["node"] for task in tasks) == ["n1", "n2"]
    assert all(task["num_nodes"] == 2 and task["num_tasks"] == 2 for task in tasks)
    assert all(task["hostnames"] == ["n1", "n2"] for task in tasks)
    # A torch rendezvous on the first host must be able to resolve it.
    assert socket.gethostbyname(tasks[0]["hostnames"][0]) == "127.0.0.1"


def requeue_once_script(out: Path) -> str:
    """A job that requeues itself on its first run and records every run's restart count."""
    return f"""#!/bin/bash
#SBATCH --requeue
#SBATCH --chdir={out}
#SBATCH --output={out}/%j.out
#SBATCH --open-mode=append
echo "${{SLURM_RESTART_COUNT:-0}} $SLURM_JOB_ID" >> {out}/runs
if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
    sleep 60  # the requeue kills this run
fi
date +%s.%N > {out}/finished
"""


def test_requeue_from_inside_keeps_job_id_and_counts_restarts(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch(requeue_once_script(tmp_path))

    assert slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    runs = (tmp_path / "runs").read_text().split("\n")[:-1]
    assert runs == [f"0 {job_id}", f"1 {job_id}"]
    records = slurm_cluster.sacct(job_id, ["JobID", "State"], duplicates=True)
    assert [(r["JobID"], r["State"]) for r in records] == [(job_id, "REQUEUED"), (job_id, "COMPLETED")]


def test_scancel_signal_usr2_reaches_every_step_task_but_not_the_batch_shell(slurm_cluster, tmp_path):
    # Each task of a two-node step records USR2 and exits 0. Were the batch shell signalled
    # too, it would die of the signal it does not trap and the job would end FAILED.
    job_id = slurm_cluster.sbatch(f"""#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1
#SBATCH --chdir={tmp_path}
#SBATCH --output={tmp_path}/%j.out
srun bash -c 'trap "touch usr2-$SLURM_PROCID; exit 0" USR2
              touch ready-$SLURM_PROCID
              while true; do sleep 0.1; done'
""")
    wait_for(
        lambda: all((tmp_path / f"ready-{rank}").exists() for rank in (0, 1)),
        "both tasks to install their USR2 trap",
    )

    slurm_cluster.run("scancel", "--signal=USR2", job_id)

    assert slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    assert (tmp_path / "usr2-0").exists() and (tmp_path / "usr2-1").exists()


def test_afterok_waits_for_a_requeued_job_and_runs_after_it(slurm_cluster, tmp_path):
    first = slurm_cluster.sbatch(requeue_once_script(tmp_path))
    second = slurm_cluster.sbatch(
        f"#!/bin/bash\ndate +%s.%N > {tmp_path}/second-started\n",
        f"--dependency=afterok:{first}",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/%j.out",
    )

    assert slurm_cluster.wait_job(second, timeout=JOB_TIMEOUT_S) == "COMPLETED"
    assert slurm_cluster.state(first) == "COMPLETED"
    assert len((tmp_path / "runs").read_text().splitlines()) == 2  # the requeue did happen
    first_finished = float((tmp_path / "finished").read_text())
    second_started = float((tmp_path / "second-started").read_text())
    assert second_started >= first_finished


def test_afterok_on_a_failed_job_leaves_the_dependent_job_pending_for_ever(slurm_cluster, tmp_path):
    """Without kill_invalid_depend (SLURM's default, and the test cluster's), nothing cancels it: the
    job layer does (jobs/slurm.py cancel_dependents), and status reads the reason."""
    # Held until the dependent job is queued, so it cannot fail before the dependency exists.
    failing = slurm_cluster.sbatch(
        "#!/bin/bash\nexit 3\n", "--hold", f"--chdir={tmp_path}", f"--output={tmp_path}/%j.out"
    )
    dependent = slurm_cluster.sbatch(
        f"#!/bin/bash\ntouch {tmp_path}/dependent-ran\n",
        f"--dependency=afterok:{failing}",
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/%j.out",
    )
    slurm_cluster.run("scontrol", "release", failing)

    assert slurm_cluster.wait_job(failing, timeout=JOB_TIMEOUT_S) == "FAILED"

    def state_and_reason() -> list[str]:
        return slurm_cluster.run("squeue", "-h", "-j", dependent, "-o", "%T %r").stdout.split()

    wait_for(
        lambda: state_and_reason() == ["PENDING", "DependencyNeverSatisfied"], "unsatisfiable dependency"
    )
    slurm_cluster.run("scancel", dependent)
    assert not (tmp_path / "dependent-ran").exists()


def test_sacct_reports_final_states_and_exit_codes(slurm_cluster, tmp_path):
    def submit(body: str) -> str:
        return slurm_cluster.sbatch(
            f"#!/bin/bash\n{body}\n", f"--chdir={tmp_path}", f"--output={tmp_path}/%j.out"
        )

    completed, failed, cancelled = submit("exit 0"), submit("exit 7"), submit("sleep 300")
    slurm_cluster.wait_job(cancelled, "RUNNING", timeout=JOB_TIMEOUT_S)
    slurm_cluster.run("scancel", cancelled)

    for job_id in (completed, failed, cancelled):
        slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S)
    outcome = {
        job_id: (record["State"], record["ExitCode"])
        for job_id in (completed, failed, cancelled)
        for record in slurm_cluster.sacct(job_id)
    }
    assert outcome[completed] == ("COMPLETED", "0:0")
    assert outcome[failed] == ("FAILED", "7:0")
    assert outcome[cancelled][0].startswith("CANCELLED")


def test_a_profile_is_applied_live_and_the_default_comes_back(slurm_cluster):
    def seen() -> dict[str, str]:
        config = slurm_cluster.run("scontrol", "show", "config").stdout
        pairs = (line.split(" = ", 1) for line in config.splitlines() if " = " in line)
        settings = {key.strip(): value.strip() for key, value in pairs}
        partition = slurm_cluster.run("scontrol", "show", "partition", "low", "-o").stdout
        qos = slurm_cluster.run(
            "sacctmgr", "-n", "-P", "show", "qos", "normal", "format=GraceTime,PreemptMode"
        )
        return {
            **{
                key: settings[key]
                for key in (
                    "PreemptType",
                    "KillWait",
                    "MessageTimeout",
                    "MaxArraySize",
                    "DependencyParameters",
                )
            },
            "partition": " ".join(
                w for w in partition.split() if w.split("=")[0] in ("GraceTime", "CpuBind")
            ),
            "qos": qos.stdout.strip(),
        }

    default = seen()
    with slurm_cluster.profile(
        preempt="cancel", preempt_type="qos", grace_s=30, kill_wait_s=5, kill_invalid_depend=True,
        cpu_bind="cores", message_timeout_s=5, max_array_size=11,
    ):  # fmt: skip
        changed = seen()
    assert changed == {
        "PreemptType": "preempt/qos", "KillWait": "5 sec", "MessageTimeout": "5 sec", "MaxArraySize": "11",
        "DependencyParameters": "kill_invalid_depend", "partition": "CpuBind=cores GraceTime=0",
        "qos": "00:00:30|cancel",
    }  # fmt: skip
    assert default == seen() == {
        "PreemptType": "preempt/partition_prio", "KillWait": "30 sec", "MessageTimeout": "10 sec",
        "MaxArraySize": "1001", "DependencyParameters": "(null)", "partition": "GraceTime=0",
        "qos": "00:00:00|cluster",
    }  # fmt: skip
