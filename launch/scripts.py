"""The sbatch scripts: the only module that knows submitit, whose rendering gives their #SBATCH lines.

A single job runs `python -m jobs.single RUN_DIR FIELDS` on every node, an array `python -m jobs.array
TASKS FIELDS`; no pickle: the script alone says what to run, so a job whose sbatch reply was lost runs as
well as any other. `--dry-run -v` prints them (`describe_submission`)."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit

from jobs.attempt import PHASES
from jobs.slurm import TrainingJob
from jobs.torchrun import AGENT_IGNORES, Rendezvous, ignoring_stop_signals, torchrun_command
from launch.arrays import ARRAYS_DIR, array_range, max_array_size
from launch.configs import phase_resources
from launch.plan import Plan, batches
from launch.snapshot import CODE_DIR, Snapshot
from launch.spec import Run


def job_script(run: Run, phase: str, dependency: str | None, code: Snapshot | None) -> str:
    """The sbatch script of one phase of a run as a single job: submitit's rendering of its #SBATCH
    lines, running `python -m jobs.single` on every node. No pickle: the script alone says what to run,
    so a job whose sbatch reply was lost runs as well as any other."""
    executor = make_executor(run, phase, dependency, code)
    arguments = shlex.join([str(run.run_dir), json.dumps(job_fields(run, phase))])
    return executor._make_submission_file_text(f"{executor.python} -u -m jobs.single {arguments}", uid="")


def array_script(
    runs: list[Run],
    phase: str,
    tasks: Path,
    dependency: str | None,
    code: Snapshot | None,
    indices: list[int] | None = None,
) -> str:
    """The sbatch script of one array: a single job's #SBATCH lines (submitit's rendering) with the
    array's range (tasks 0..n-1, or `indices`), name and per-run log paths, running `python -m jobs.array`
    on every node."""
    executor = make_executor(runs[0], phase, dependency, code)
    executor.folder = tasks / "%a" / "slurm"  # %a: the task's link to its run directory
    executor.parameters["map_count"] = len(runs)  # submitit's array log names, %A_%a
    executor.parameters["job_name"] = array_name(runs[0], phase)
    limit = phase_resources(runs[0], phase).max_parallel
    executor.parameters["additional_parameters"]["array"] = array_range(len(runs), limit, indices)
    arguments = shlex.join([str(tasks), json.dumps(job_fields(runs[0], phase))])
    command = f"{executor.python} -u -m jobs.array {arguments}"
    return executor._make_submission_file_text(command, uid="")


def job_fields(run: Run, phase: str) -> dict[str, Any]:
    """The TrainingJob of `phase` as JSON fields, less the run directory (which the job is told apart)."""
    return {k: v for k, v in asdict(training_job(run, phase)).items() if k != "run_dir"}


def job_name(run: Run, phase: str) -> str:
    """The job's name in SLURM: what `status` and `cancel` check an id against before using it."""
    return f"{run.config.meta.get('sweep', 'sogclr')}.{run.name}.{phase}"


def array_name(run: Run, phase: str) -> str:
    """The name of the sweep's `phase` arrays in SLURM, which each of their tasks has."""
    return f"{run.config.meta.get('sweep', 'sogclr')}.{phase}"


def training_job(run: Run, phase: str) -> TrainingJob:
    slurm = phase_resources(run, phase)
    return TrainingJob(
        phase,
        run.run_dir,
        slurm.nodes,
        slurm.ranks_per_node,
        slurm.cpus_per_task,
        slurm.max_requeues,
        slurm.max_failures,
    )


def make_executor(
    run: Run, phase: str, dependency: str | None = None, code: Snapshot | None = None
) -> submitit.SlurmExecutor:
    """A submitit executor with the phase's resources, `--requeue`, USR2 `signal_lead_s` early, and the
    frozen `code` first on every process's PYTHONPATH."""
    slurm = phase_resources(run, phase)
    # The job task starts with USR2 and TERM ignored until it installs its handlers: unhandled, a signal
    # in its first second kills it (measured: the job FAILED, "task 0: User defined signal 2", no attempt
    # recorded). A time-limit warning lost so is caught at the time limit (jobs/stop.py).
    python = shlex.join(ignoring_stop_signals([sys.executable]))
    executor = submitit.SlurmExecutor(folder=run.files.slurm_logs, python=python)
    optional = {
        "gpus_per_node": slurm.gpus_per_node or None,
        "mem": f"{slurm.mem_gb}GB" if slurm.mem_gb else None,
        "partition": slurm.partition,
        "account": slurm.account,
        "qos": slurm.qos,
        "constraint": slurm.constraint,
    }
    extra: dict[str, Any] = {"requeue": True, **slurm.additional}
    if dependency:
        extra["dependency"] = dependency
    executor.update_parameters(
        job_name=job_name(run, phase),
        nodes=slurm.nodes,
        ntasks_per_node=1,
        cpus_per_task=slurm.cpus_per_task,
        time=slurm.time,
        # the snapshot last, so that no setup line (`export PYTHONPATH=...`) can put other code first
        setup=list(slurm.setup) + ([code.setup_line()] if code else []),
        signal_delay_s=slurm.signal_lead_s,
        # srun 22.05-23.02 does not inherit --cpus-per-task: where the site binds tasks to cores, the
        # node's one task would get one core (measured: Cpus_allowed_list 0 of 0-1; README).
        srun_args=["--cpus-per-task", str(slurm.cpus_per_task)],
        additional_parameters=extra,
        **{key: value for key, value in optional.items() if value is not None},
    )
    return executor


def describe_submission(runs: list[Run]) -> str:
    """For `--dry-run -v`: what a first submission of `runs` would submit, array by array (split at the
    controller's MaxArraySize) and single job by single job, with the sbatch scripts."""
    parts = []
    for batch in batches([Plan(run, run.phases) for run in runs], max_array_size()):
        batch_runs = [plan.run for plan in batch]
        if len(batch_runs) == 1:
            parts += [f"# ===== run {batch_runs[0].name}: single jobs", describe_job(batch_runs[0])]
        else:
            parts += [f"# ===== {len(batch_runs)} runs: one array per phase", describe_arrays(batch_runs)]
    return "\n".join(parts)


def _placeholder_code(sweep_dir: Path) -> Snapshot:
    """The code a dry run shows its jobs importing: frozen at submission, and a dry run freezes nothing."""
    return Snapshot(sweep_dir / CODE_DIR / "<digest>", "<digest>", None)


def describe_job(run: Run) -> str:
    """Each phase's sbatch script of a run submitted as single jobs, and its nodes' torchrun lines."""
    parts = []
    code = _placeholder_code(run.run_dir.parent)
    for phase in run.phases:
        dependency = "afterok:<pretraining job id>" if phase == "lincls" else None
        script = job_script(run, phase, dependency, code)
        parts += [
            f"# --- {phase}: sbatch script",
            script,
            f"# --- {phase}: torchrun on each node",
            *_torchrun_lines(run, phase),
        ]
    return "\n".join(parts)


def describe_arrays(runs: list[Run]) -> str:
    """Each phase's array script for `runs` (identical resources), which task runs which run, and the
    torchrun lines of task 0 (every task runs its own run's config)."""
    parts = []
    sweep_dir = runs[0].run_dir.parent
    code = _placeholder_code(sweep_dir)
    phases = runs[0].phases
    for phase in phases:
        tasks = sweep_dir / ARRAYS_DIR / f"{phase}-<token>"
        dependency = "aftercorr:<pretraining array id>" if phase == "lincls" else None
        parts += [
            f"# --- {phase}: sbatch script of the array",
            array_script(runs, phase, tasks, dependency, code),
            f"# --- {phase}: task i runs the run that {tasks}/i links to",
            *(f"#   {index}: {run.name} -> {run.run_dir}" for index, run in enumerate(runs)),
            f"# --- {phase}: torchrun on each node of task 0",
            *_torchrun_lines(runs[0], phase),
        ]
    return "\n".join(parts)


def _torchrun_lines(run: Run, phase: str) -> list[str]:
    slurm = phase_resources(run, phase)
    lines = [f"# started with {' and '.join(AGENT_IGNORES)} ignored; the training processes handle them"]
    if slurm.nodes > 1:
        lines.append("# FIRST_HOST: first of `scontrol show hostnames $SLURM_JOB_NODELIST`")
        lines.append("# PORT: 20000 + job id % 12768 (below the ephemeral ports)")
    rendezvous = Rendezvous("$FIRST_HOST", "$PORT", "$SLURM_JOB_ID") if slurm.nodes > 1 else None
    command = torchrun_command(
        PHASES[phase].module,
        run.files.config,
        slurm.ranks_per_node,
        slurm.nodes,
        "$SLURM_NODEID",
        rendezvous,
    )
    return lines + [" ".join(command)]
