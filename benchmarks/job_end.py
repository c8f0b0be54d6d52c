"""The SLURM calls of one job's end, before (main 17156b2's jobs/slurm.py) and after jobs/stop.py, on a
real SLURM cluster whose queue holds other users' pending jobs.

The queue gets `--others` pending jobs of another user (one held array, listed task by task by
`squeue -r`), and ours: a job with an `afterok` evaluation. Node 0's SLURM side of the job's end is then
run from this process as the job task runs it, for two stops: a cancel (scancel; the job's TERM is
trapped so that it stays COMPLETING, as while trainers save) and a preemption under SLURM's default
grace time 0 with PreemptMode=REQUEUE. Each SLURM command is counted by a shim on PATH that logs its
name and the size of its answer, then returns the real command's output. The old code is loaded from
git (`git show 17156b2:jobs/slurm.py`).

    eval "$(scripts/local-slurm env)"   # the local cluster (scripts/local-slurm up, default profile)
    python benchmarks/job_end.py [--others 1000]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.slurm_calls import install_shims, logged_calls  # noqa: E402
from jobs import slurm as after  # noqa: E402
from jobs.stop import Budget  # noqa: E402

BEFORE_COMMIT = "17156b2"
COUNTED = ("squeue", "sacct", "scontrol", "scancel")


def load_before(directory: Path) -> ModuleType:
    """main's jobs/slurm.py before this change, as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:jobs/slurm.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = directory / "slurm_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("slurm_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "-o", "/dev/null", *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip().split(";")[0]


def wait_state(job: str, *states: str) -> None:
    for _ in range(300):
        shown = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
        if any(f"JobState={state}" in shown for state in states):
            return
        time.sleep(0.2)
    sys.exit(f"job {job} never reached {states}")


def our_job(stop: str) -> tuple[str, str]:
    """Our running job (its TERM trapped) and its evaluation, stopped as `stop` says."""
    job = sbatch("-c", "2", "-w", "n1", "--wrap", "trap '' TERM; sleep 300")
    evaluation = sbatch(f"--dependency=afterok:{job}", "--wrap", "true")
    wait_state(job, "RUNNING")
    if stop == "cancel":
        subprocess.run(["scancel", job], check=True)
    else:
        sbatch("-p", "high", "-w", "n1", "-c", "2", "--wrap", "sleep 1")
    wait_state(job, "COMPLETING", "CANCELLED", "PENDING")
    return job, evaluation


def end_before(module: ModuleType, job: str) -> str:
    module.cancel_dependents_if_ending(job)  # at the signal
    outcome = module.why_stopped(job, "signal SIGTERM")["outcome"]  # after the trainers exit
    if outcome == "cancelled":
        module.cancel_dependents(job)
    return outcome


def end_after(job: str) -> str:
    task = after.SlurmTask(job_id=int(job), node_rank=0, hosts=["n1"], restart_count=0)
    after.act_on_signal(task, "signal SIGTERM")
    attempt = {"job_id": int(job), "start_step": 0, "end_step": 0, "outcome": "preempted", "reason": ""}
    state_path = Path(tempfile.mkdtemp()) / "state.json"
    plan = after.conclude(task, "signal SIGTERM", attempt, state_path, Budget(max_requeues=20))
    if plan.action == "end":  # a cancel; a preemption's requeue is not what is counted here
        after.carry_out(task, state_path, plan)
    return plan.outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--others", type=int, default=1000, help="other users' pending jobs in the queue")
    others = parser.parse_args().others
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        log = directory / "calls.log"
        before = load_before(directory)
        theirs = sbatch("--uid", "nobody", "--hold", f"--array=0-{others - 1}", "--wrap", "true")
        install_shims(directory / "shims", log, COUNTED)
        print(f"queue: {others} pending tasks of another user, then our job and its evaluation")
        print(f"{'stop':<12}{'code':<8}{'outcome':<11}{'evaluation':<12}SLURM calls (bytes read)")
        try:
            for stop in ("cancel", "preemption"):
                for name, end in (("before", lambda job: end_before(before, job)), ("after", end_after)):
                    job, evaluation = our_job(stop)
                    log.write_text("")
                    with contextlib.redirect_stdout(io.StringIO()):
                        outcome = end(job)
                    counted, read = logged_calls(log)
                    shown = subprocess.run(
                        ["squeue", "-h", "-j", evaluation, "-o", "%T"], capture_output=True, text=True
                    )
                    summary = " ".join(
                        f"{command} {counted[command]}" for command in COUNTED if counted[command]
                    )
                    left = shown.stdout.strip() or "gone"
                    print(f"{stop:<12}{name:<8}{outcome:<11}{left:<12}{summary} ({read} B)")
                    subprocess.run(["scancel", job, evaluation], capture_output=True)
                    time.sleep(1)
        finally:
            subprocess.run(["scancel", theirs], capture_output=True)


if __name__ == "__main__":
    main()
