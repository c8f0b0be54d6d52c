"""Submission to SLURM: each run's config, its pretraining job, and its linear evaluation chained after.

`submit_sweep` holds the sweep's lock, reads where every run stands, and submits only what is missing:
runs that are queued, running or done are left alone; failed or cancelled ones only with
`--resubmit-failed` (and when pretraining is done, only its evaluation is resubmitted). The evaluation
job waits with `afterok` on the pretraining job: requeues keep the job id, so the dependency survives
them. A pretraining that ends without completing has its evaluation cancelled by its node 0; one that
can still never run (nothing of ours ran to cancel it) is replaced, and cancelled, by the resubmission.
The jobs run the code frozen at submission (launch/snapshot.py).
"""

from __future__ import annotations

import contextlib
import io
import subprocess
from collections.abc import Iterator
from typing import Any

import submitit
from rich.console import Console
from rich.table import Table

from jobs.attempt import PHASES
from jobs.slurm import TrainingJob
from jobs.torchrun import AGENT_IGNORES, Rendezvous, torchrun_command
from launch.manifest import (
    NEVER_RUNS,
    UNKNOWN,
    PhaseStanding,
    cluster_name,
    current_job,
    read_manifest,
    record_job,
    standings,
    sweep_lock,
    write_manifest,
)
from launch.snapshot import CODE_DIR, Snapshot, freeze, live_code
from launch.spec import Run, SlurmConfig, SpecError, SweepSpec
from sogclr.config import RunConfig, dump_run_config, load_run_config, recipe_differences
from sogclr.state import now


class SubmissionError(Exception):
    """sbatch refused a job: one line naming the run, the phase and sbatch's message."""


def submit_sweep(
    spec: SweepSpec,
    runs: list[Run],
    resubmit_failed: bool,
    console: Console,
    snapshot: bool = True,
    reconfigure: bool = False,
) -> int:
    """Submit what each run still needs; print run, job ids and what was done. Returns the exit status:
    1 when sbatch failed (the submission stops there) or SLURM could not say where a run stands.

    The jobs run the code frozen now (launch/snapshot.py); with `snapshot=False`, whatever is installed
    when each attempt starts. A run whose recipe differs from its config.yaml fails the whole submission
    before anything is written, unless `reconfigure`.
    """
    directory = spec.directory
    table = Table(title=f"{spec.name}: submission", title_justify="left")
    for column in ("run", "pretraining job", "linear-eval job", "action"):
        table.add_column(column, overflow="fold")
    failure, status = None, 0
    with sweep_lock(directory):
        check_recipes(runs, reconfigure)
        manifest = read_manifest(directory)
        where = standings(runs, manifest)
        cluster = cluster_name()
        code = freeze(directory) if snapshot else None
        if code is None:
            console.print(
                "[yellow]warning:[/] --no-snapshot: jobs import the code installed when each "
                "attempt starts; edits made while they wait or run change what they run",
                highlight=False,
            )
        for run in runs:
            phases, action = phases_to_submit(run, where[run.name], resubmit_failed)
            if any(standing.state == UNKNOWN for standing in where[run.name].values()):
                status = 1  # not submitted, and not known to be running: the sweep may be incomplete
            cancel_replaced(where[run.name], phases)
            live = where[run.name]["pretrain"]
            try:
                for phase, job_id in submit_run(run, phases, code, live.job_id if live.active else None):
                    about = {"job_name": job_name(run, phase), "cluster": cluster}
                    record_job(manifest, run.name, phase, job_id, now(), **about)
                    write_manifest(directory, manifest)  # at once: an id recorded is never orphaned
            except SubmissionError as err:
                failure, action = err, "sbatch failed"
            ids = [current_job(manifest, run.name, phase) or "-" for phase in PHASES]
            table.add_row(run.name, *ids, action)
            if failure:
                break  # a bad partition or a submission limit refuses the next runs too
    console.print(table)
    if failure:
        Console(stderr=True).print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        return 1
    return status


def phases_to_submit(
    run: Run, standing: dict[str, PhaseStanding], resubmit_failed: bool
) -> tuple[list[str], str]:
    """Which phases of `run` to submit now, and a word on why (or why not)."""
    wanted = ["pretrain", "lincls"] if run.config.lincls is not None else ["pretrain"]
    pretrain = standing["pretrain"]
    if unknown := [s for phase, s in standing.items() if phase in wanted and s.state == UNKNOWN]:
        return [], f"nothing: {UNKNOWN} ({unknown[0].reason})"
    if pretrain.state != "done":
        if pretrain.active and "lincls" in wanted and standing["lincls"].job_id is None:
            # its evaluation's sbatch failed after the pretraining's went through: submit that alone
            return ["lincls"], f"submitted linear eval (after pretraining job {pretrain.job_id})"
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


def cancel_replaced(standing: dict[str, PhaseStanding], phases: list[str]) -> None:
    """scancel the queued jobs that the submission of `phases` replaces: evaluations still pending on a
    pretraining that can never complete (clusters without kill_invalid_depend keep them for ever)."""
    stale = [standing[phase].job_id for phase in phases if standing[phase].state == NEVER_RUNS]
    if stale:
        subprocess.run(["scancel", *stale], check=True)


def submit_run(
    run: Run, phases: list[str], code: Snapshot | None, after: str | None = None
) -> Iterator[tuple[str, str]]:
    """Write the run's config, submit `phases` (lincls `afterok` on the pretraining job submitted here,
    else on `after`), and yield each (phase, job id) as soon as sbatch returns it, before the next sbatch.
    Raises SubmissionError when sbatch refuses one."""
    if not phases:
        return
    write_run_config(run, code.record() if code else live_code())
    for phase in phases:
        executor = make_executor(run, phase, dependency=f"afterok:{after}" if after else None, code=code)
        job_id = sbatch(executor, training_job(run, phase), f"run {run.name} {phase}")
        yield phase, job_id
        after = job_id if phase == "pretrain" else after


def sbatch(executor: submitit.SlurmExecutor, job: TrainingJob, what: str) -> str:
    """Submit `job`; its id, or SubmissionError with sbatch's message on one line."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error too: say it once
            return executor.submit(job).job_id
    except (submitit.core.utils.FailedJobError, OSError) as err:
        raise SubmissionError(f"{what}: sbatch failed: {' '.join(str(err).split())}") from None


def check_recipes(runs: list[Run], reconfigure: bool) -> None:
    """SpecError naming the fields, for the first run whose recipe (pretrain, lincls) differs from the
    one in its config.yaml: a resumed run would continue under another schedule. Resources may change."""
    for run in runs:
        path = run.files.config
        if reconfigure or not path.is_file():
            continue
        recorded = load_run_config(path).model_dump(mode="json")
        if differences := recipe_differences(recorded, run.config.model_dump(mode="json")):
            raise SpecError(
                f"run {run.name}: the recipe differs from its {path}: {'; '.join(differences)} "
                "(--reconfigure to rewrite it)"
            )


def job_name(run: Run, phase: str) -> str:
    """The job's name in SLURM: what `status` and `cancel` check an id against before using it."""
    return f"{run.config.meta.get('sweep', 'sogclr')}.{run.name}.{phase}"


def write_run_config(run: Run, code: dict[str, Any]) -> RunConfig:
    """Write `<run_dir>/config.yaml`, the file every phase reads, with provenance; returns it."""
    config = provenance_config(run, code)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    dump_run_config(config, run.files.config)
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
    executor = submitit.SlurmExecutor(folder=run.files.slurm_logs)
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
        run.files.config,
        slurm.ranks_per_node,
        slurm.nodes,
        "$SLURM_NODEID",
        rendezvous,
    )
    return lines + [" ".join(command)]
