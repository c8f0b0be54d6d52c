"""Submission to SLURM: each run's config, its pretraining job, and its linear evaluation chained after.

`submit_sweep` holds the sweep's lock, reads where every run stands, and submits only what is missing:
runs that are queued, running or done are left alone; failed or cancelled ones only with
`--resubmit-failed` (and when pretraining is done, only its evaluation is resubmitted). The evaluation
job waits with `afterok` on the pretraining job: requeues keep the job id, so the dependency survives
them, and a failed pretraining cancels its evaluation (kill_invalid_depend) or leaves it never runnable.
"""

from __future__ import annotations

from typing import Any

import submitit
from rich.console import Console
from rich.table import Table

from jobs.attempt import CONFIG_FILE, PHASES
from jobs.slurm import TrainingJob
from jobs.torchrun import AGENT_IGNORES, Rendezvous, torchrun_command
from launch.manifest import (
    PhaseStanding,
    current_job,
    read_manifest,
    record_job,
    standings,
    sweep_lock,
    write_manifest,
)
from launch.snapshot import CODE_DIR, Snapshot, freeze, live_code
from launch.spec import Run, SlurmConfig, SweepSpec
from sogclr.config import RunConfig, dump_run_config
from sogclr.state import now

SLURM_FOLDER = "slurm"


def submit_sweep(
    spec: SweepSpec, runs: list[Run], resubmit_failed: bool, console: Console, snapshot: bool = True
) -> int:
    """Submit what each run still needs; print run, job ids and what was done. Returns the exit status.

    The jobs run the code frozen now (launch/snapshot.py); with `snapshot=False`, whatever is installed
    when each attempt starts.
    """
    directory = spec.directory
    table = Table(title=f"{spec.name}: submission", title_justify="left")
    for column in ("run", "pretraining job", "linear-eval job", "action"):
        table.add_column(column, overflow="fold")
    with sweep_lock(directory):
        manifest = read_manifest(directory)
        where = standings(runs, manifest)
        code = freeze(directory) if snapshot else None
        if code is None:
            console.print(
                "[yellow]warning:[/] --no-snapshot: jobs import the code installed when each "
                "attempt starts; edits made while they wait or run change what they run",
                highlight=False,
            )
        for run in runs:
            phases, action = phases_to_submit(run, where[run.name], resubmit_failed)
            for phase, job_id in submit_run(run, phases, code).items():
                record_job(manifest, run.name, phase, job_id, now())
            write_manifest(directory, manifest)  # after every run: a crash midway loses no job id
            ids = [current_job(manifest, run.name, phase) or "-" for phase in PHASES]
            table.add_row(run.name, *ids, action)
    console.print(table)
    return 0


def phases_to_submit(
    run: Run, standing: dict[str, PhaseStanding], resubmit_failed: bool
) -> tuple[list[str], str]:
    """Which phases of `run` to submit now, and a word on why (or why not)."""
    wanted = ["pretrain", "lincls"] if run.config.lincls is not None else ["pretrain"]
    pretrain = standing["pretrain"]
    if pretrain.state != "done":
        return _unless_settled(pretrain, wanted, "pretraining", resubmit_failed)
    if "lincls" not in wanted or standing["lincls"].state == "done":
        return [], "nothing: done"
    return _unless_settled(standing["lincls"], ["lincls"], "linear eval", resubmit_failed)


def _unless_settled(
    standing: PhaseStanding, phases: list[str], what: str, resubmit_failed: bool
) -> tuple[list[str], str]:
    if standing.job_id is None:
        return phases, "submitted"
    if standing.active:
        return [], f"nothing: {what} {standing.state}"
    if resubmit_failed:
        return phases, f"resubmitted ({what} was {standing.state})"
    return [], f"nothing: {what} {standing.state} (--resubmit-failed to submit again)"


def submit_run(run: Run, phases: list[str], code: Snapshot | None) -> dict[str, str]:
    """Write the run's config, submit `phases` (lincls after pretrain); returns phase -> job id."""
    if not phases:
        return {}
    write_run_config(run, code.record() if code else live_code())
    job_ids: dict[str, str] = {}
    for phase in phases:
        after = job_ids.get("pretrain")
        executor = make_executor(run, phase, dependency=f"afterok:{after}" if after else None, code=code)
        job_ids[phase] = executor.submit(training_job(run, phase)).job_id
    return job_ids


def write_run_config(run: Run, code: dict[str, Any]) -> RunConfig:
    """Write `<run_dir>/config.yaml`, the file every phase reads, with provenance; returns it."""
    config = provenance_config(run, code)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(config, run.run_dir / CONFIG_FILE)
    return config


def provenance_config(run: Run, code: dict[str, Any]) -> RunConfig:
    """The run's config with `meta` extended by the code it runs (`meta.code`) and its resources."""
    resources = {"pretrain": run.slurm.model_dump(mode="json")}
    if run.lincls_slurm is not None:
        resources["lincls"] = run.lincls_slurm.model_dump(mode="json")
    meta = {**run.config.meta, "code": code, "resources": resources}
    return run.config.model_copy(update={"meta": meta})


def phase_resources(run: Run, phase: str) -> SlurmConfig:
    return run.lincls_slurm if phase == "lincls" else run.slurm


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
    executor = submitit.SlurmExecutor(folder=run.run_dir / SLURM_FOLDER)
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
        job_name=f"{run.config.meta.get('sweep', 'sogclr')}.{run.name}.{phase}",
        nodes=slurm.nodes,
        ntasks_per_node=1,
        cpus_per_task=slurm.cpus_per_task,
        time=slurm.time,
        setup=([code.setup_line()] if code else []) + list(slurm.setup),
        signal_delay_s=slurm.signal_lead_s,
        additional_parameters=extra,
        **{key: value for key, value in optional.items() if value is not None},
    )
    return executor


def describe_job(run: Run) -> str:
    """For `--dry-run -v`: each phase's sbatch script and its nodes' torchrun command lines."""
    parts = []
    code = Snapshot(run.run_dir.parent / CODE_DIR / "<digest>", "<digest>", None)  # frozen at submission
    for phase in ["pretrain", "lincls"] if run.lincls_slurm is not None else ["pretrain"]:
        dependency = "afterok:<pretraining job id>" if phase == "lincls" else None
        executor = make_executor(run, phase, dependency, code)
        # submitit's own rendering of the script it would submit (private, but exactly what sbatch gets)
        script = executor._make_submission_file_text(executor._submitit_command_str, uid="<uid>")
        parts += [
            f"# --- {phase}: sbatch script",
            script,
            f"# --- {phase}: torchrun on each node",
            *_torchrun_lines(run, phase),
        ]
    return "\n".join(parts)


def _torchrun_lines(run: Run, phase: str) -> list[str]:
    slurm = phase_resources(run, phase)
    lines = [f"# started with {' and '.join(AGENT_IGNORES)} ignored; the training processes handle them"]
    if slurm.nodes > 1:
        lines.append("# FIRST_HOST: first of `scontrol show hostnames $SLURM_JOB_NODELIST`")
        lines.append("# PORT: 20000 + job id % 20000")
    rendezvous = Rendezvous("$FIRST_HOST", "$PORT", "$SLURM_JOB_ID") if slurm.nodes > 1 else None
    command = torchrun_command(
        PHASES[phase].module,
        run.run_dir / CONFIG_FILE,
        slurm.ranks_per_node,
        slurm.nodes,
        "$SLURM_NODEID",
        rendezvous,
    )
    return lines + [" ".join(command)]
