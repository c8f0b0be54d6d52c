"""Submission to SLURM: each run's config, its pretraining job, and its linear evaluation chained after.

`submit_sweep` holds the sweep's lock, reads where every run stands, and submits only what is missing:
runs that are queued, running, done or pruned are left alone; failed or cancelled ones only with
`--resubmit-failed` (and when pretraining is done, only its evaluation is resubmitted); pruned ones only
with `--resume-pruned` (both phases). Runs with
identical resources go as job arrays (launch/arrays.py), one task per run; the others as single jobs.
The evaluation waits with `afterok` on its pretraining job, or, in an array, with `aftercorr` on its
own pretraining task: requeues keep the ids, so the dependency survives them. A pretraining that ends
without completing has its evaluation cancelled by its node 0; one that can still never run (nothing of
ours ran to cancel it) is replaced, and cancelled, by the resubmission. The jobs run the code frozen at
submission (launch/snapshot.py).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import submitit
from rich.console import Console

from jobs.attempt import PHASES
from jobs.slurm import TrainingJob
from jobs.torchrun import AGENT_IGNORES, Rendezvous, ignoring_stop_signals, torchrun_command
from launch.arrays import ARRAYS_DIR, array_range, link_tasks, max_array_size
from launch.manifest import (
    NEVER_RUNS,
    PRUNED,
    TOKEN_PREFIX,
    UNKNOWN,
    PhaseStanding,
    SlurmUnavailable,
    add_pending,
    cluster_name,
    current_job,
    find_submissions,
    new_token,
    read_manifest,
    settle_pending,
    standings,
    sweep_lock,
    write_manifest,
)
from launch.snapshot import CODE_DIR, Snapshot, freeze, live_code
from launch.spec import Run, SlurmConfig, SpecError, SweepSpec
from launch.table import print_table
from sogclr.contract.config import RunConfig, dump_run_config, load_run_config, recipe_differences
from sogclr.contract.state import now

CONFIG_WRITERS = 16  # threads writing an array's run configs


class SubmissionError(Exception):
    """sbatch refused a job: one line naming the run, the phase and sbatch's message."""


@dataclass(frozen=True)
class Plan:
    """What to submit for one run: its phases, and the live pretraining job its evaluation waits on."""

    run: Run
    phases: list[str]
    after: str | None = None


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

    Runs with identical resources go as job arrays (`slurm.arrays`, launch/arrays.py), the others (and
    an array of one) as single jobs. The jobs run the code frozen now (launch/snapshot.py); with
    `snapshot=False`, whatever is installed when each attempt starts. A run whose recipe differs from
    its config.yaml fails the whole submission before anything is written, unless `reconfigure`.
    """
    directory = spec.directory
    failure, status = None, 0
    with sweep_lock(directory):
        check_recipes(runs, reconfigure)
        manifest = read_manifest(directory)
        lost_replies = bool(manifest.get("pending"))
        where = standings(runs, manifest)
        if lost_replies:
            write_manifest(directory, manifest)  # what the lookup of their tokens settled
        ledger = Ledger(directory, manifest, cluster_name())
        code = freeze(directory) if snapshot else None
        if code is None:
            console.print(
                "[yellow]warning:[/] --no-snapshot: jobs import the code installed when each "
                "attempt starts; edits made while they wait or run change what they run",
                highlight=False,
            )
        if reconfigure:
            reconfigure_runs(runs, where, code.record() if code else live_code(), console)
        plans, actions = [], {}
        for run in runs:
            phases, actions[run.name] = phases_to_submit(run, where[run.name], resubmit_failed)
            if any(standing.state == UNKNOWN for standing in where[run.name].values()):
                status = 1  # not submitted, and not known to be running: the sweep may be incomplete
            live = where[run.name]["pretrain"]
            if phases:
                plans.append(Plan(run, phases, live.job_id if live.active else None))
        cancel_replaced(plans, where)
        pending = batches(plans, max_array_size())
        for number, batch in enumerate(pending):
            try:
                submit_batch(batch, code, ledger)
            except SubmissionError as err:
                failure = err  # a bad partition or a submission limit refuses the next runs too
                actions |= {plan.run.name: "sbatch failed" for plan in batch}
                actions |= {
                    p.run.name: "not submitted: an sbatch failed" for b in pending[number + 1 :] for p in b
                }
                break
        ledger.close()
    rows = [
        (run.name, *(current_job(manifest, run.name, phase) or "-" for phase in PHASES), actions[run.name])
        for run in runs
    ]
    print_table(
        console, f"{spec.name}: submission", ("run", "pretraining job", "linear-eval job", "action"), rows
    )
    if failure:
        Console(stderr=True).print(f"[bold red]error:[/] {failure}", highlight=False, soft_wrap=True)
        return 1
    return status


@dataclass
class Ledger:
    """The manifest of a submission in progress. Each sbatch is noted as pending with a token (which the
    job carries in its comment), and the manifest written, before it is made; its job ids are recorded
    as soon as they are known, and written with the next sbatch's note (one manifest write per sbatch),
    or by `close`. A job is never orphaned: until its ids are written, its token finds it (as it finds
    one whose sbatch reply was lost), so it is never submitted twice."""

    directory: Path
    manifest: dict[str, Any]
    cluster: str | None
    unwritten: bool = False  # ids recorded since the manifest was last written

    def sbatch(self, script: Path, what: str, phase: str, name: str, runs: list[str], **array: Any) -> str:
        """Submit the batch script `script` for `runs` (an array: `array=True`, and `indices` where its
        task indices are not 0..n-1); its job id, recorded. SubmissionError when sbatch fails and SLURM
        has no job with its token (or cannot say: the token stays pending for the next submission)."""
        token = new_token()
        add_pending(
            self.manifest, token, phase, runs, job_name=name, cluster=self.cluster, submitted=now(), **array
        )
        write_manifest(self.directory, self.manifest)
        self.unwritten = False
        try:
            job_id = sbatch_script(script, what, token)
        except SubmissionError as err:
            job_id = self.look_up(token, err)  # the controller may have made the job and lost the reply
        settle_pending(self.manifest, token, job_id)
        self.unwritten = True
        return job_id

    def close(self) -> None:
        """Write the ids recorded since the last sbatch."""
        if self.unwritten:
            write_manifest(self.directory, self.manifest)
            self.unwritten = False

    def look_up(self, token: str, err: SubmissionError) -> str:
        """The id of the job that a failed sbatch made after all, or `err` (with what SLURM said)."""
        (entry,) = [entry for entry in self.manifest["pending"] if entry["token"] == token]
        try:
            found = find_submissions([entry])
        except SlurmUnavailable as unavailable:
            raise SubmissionError(
                f"{err}; SLURM could not say whether it made the job ({unavailable}): the next "
                "submission looks for it before submitting again"
            ) from None
        if token not in found:
            raise err
        return found[token]


def batches(plans: list[Plan], max_array_size: int) -> list[list[Plan]]:
    """The plans in submission order, grouped: the runs of one group become one array per phase (at
    most `max_array_size` tasks), a group of one is a single job."""
    groups: dict[tuple, list[Plan]] = {}
    for index, plan in enumerate(plans):
        groups.setdefault(array_key(plan) or (index,), []).append(plan)
    size = max(1, max_array_size)  # MaxArraySize=0: arrays are disabled, every run is a single job
    return [group[start : start + size] for group in groups.values() for start in range(0, len(group), size)]


def array_key(plan: Plan) -> tuple | None:
    """What the runs of one array share: their phases, each phase's resources, and the pretraining
    array whose tasks their evaluations wait on, if any (an evaluation whose own sbatch failed goes in
    an array with the same task indices, `aftercorr` on that array). None for a run that goes as single
    jobs: `slurm.arrays: false`, or an evaluation that waits on a live pretraining single job."""
    after_array, _, task = (plan.after or "").partition("_")
    if not plan.run.slurm.arrays or (plan.after is not None and not task):
        return None
    resources = (phase_resources(plan.run, phase).model_dump_json() for phase in plan.phases)
    return (after_array, *plan.phases, *resources)


def submit_batch(batch: list[Plan], code: Snapshot | None, ledger: Ledger) -> None:
    """Submit a batch (see `batches`), recording each job in the ledger as soon as sbatch returns."""
    if len(batch) == 1:
        (plan,) = batch
        submit_run(plan.run, plan.phases, code, ledger, plan.after)
    else:
        after = batch[0].after and batch[0].after.partition("_")[0]  # evaluations of a live array
        indices = [int(plan.after.partition("_")[2]) for plan in batch] if after else None
        submit_arrays([plan.run for plan in batch], batch[0].phases, code, ledger, after, indices)


def submit_arrays(
    runs: list[Run],
    phases: list[str],
    code: Snapshot | None,
    ledger: Ledger,
    after: str | None = None,
    indices: list[int] | None = None,
) -> None:
    """Write the runs' configs and submit one array per phase, evaluation task i `aftercorr` on
    pretraining task i (of the array submitted here, else of the array `after`); task i runs runs[i],
    or with `indices`, task indices[i] does."""
    record = code.record() if code else live_code()
    with ThreadPoolExecutor(CONFIG_WRITERS) as pool:  # each write waits on its fsyncs: overlap them
        list(pool.map(lambda run: write_run_config(run, record), runs))
    for phase in phases:
        tasks = link_tasks(ledger.directory, phase, runs, indices)
        dependency = f"aftercorr:{after}" if after else None
        (tasks / "job.sh").write_text(array_script(runs, phase, tasks, dependency, code, indices))
        what = f"array of {len(runs)} runs ({runs[0].name}, ...) {phase}"
        names = [run.name for run in runs]
        array = {"array": True, **({"indices": indices} if indices else {})}
        array_id = ledger.sbatch(tasks / "job.sh", what, phase, array_name(runs[0], phase), names, **array)
        after = array_id if phase == "pretrain" else after


def phases_to_submit(
    run: Run, standing: dict[str, PhaseStanding], resubmit_failed: bool
) -> tuple[list[str], str]:
    """Which phases of `run` to submit now, and a word on why (or why not)."""
    wanted = run.phases
    pretrain = standing["pretrain"]
    if unknown := [s for phase, s in standing.items() if phase in wanted and s.state == UNKNOWN]:
        return [], f"nothing: {UNKNOWN} ({unknown[0].reason})"
    if pretrain.state == PRUNED:  # settled: neither a plain submit nor --resubmit-failed starts it again
        if run.resume_pruned:
            return wanted, "resubmitted to continue past the rung that pruned it"
        return [], "nothing: pruned (--resume-pruned to continue it)"
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


def cancel_replaced(plans: list[Plan], where: dict[str, dict[str, PhaseStanding]]) -> None:
    """scancel the queued jobs that the plans replace: evaluations still pending on a pretraining that
    can never complete (clusters without kill_invalid_depend keep them for ever). One scancel in all."""
    stale = [
        standing.job_id
        for plan in plans
        for phase in plan.phases
        if (standing := where[plan.run.name][phase]).state == NEVER_RUNS
    ]
    if stale:
        # scancel exits 1 when a job ended meanwhile (kill_invalid_depend got there first): that is fine
        subprocess.run(["scancel", *stale], capture_output=True)


def submit_run(
    run: Run, phases: list[str], code: Snapshot | None, ledger: Ledger, after: str | None = None
) -> None:
    """Write the run's config and submit `phases` as single jobs (lincls `afterok` on the pretraining
    job submitted here, else on `after`), each recorded before the next sbatch. Raises SubmissionError
    when sbatch refuses one."""
    if not phases:
        return
    if after is None:  # else its pretraining job is live: the config of an active run is never rewritten
        write_run_config(run, code.record() if code else live_code())
    for phase in phases:
        script = run.files.slurm_logs / f"{phase}-{new_token()}.sh"
        script.parent.mkdir(parents=True, exist_ok=True)
        script.write_text(job_script(run, phase, f"afterok:{after}" if after else None, code))
        job_id = ledger.sbatch(script, f"run {run.name} {phase}", phase, job_name(run, phase), [run.name])
        after = job_id if phase == "pretrain" else after


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


def sbatch_script(path: Path, what: str, token: str) -> str:
    """Submit the batch script at `path`, its comment carrying `token` (see Ledger); the job id, or
    SubmissionError with sbatch's message."""
    command = ["sbatch", "--parsable", f"--comment={TOKEN_PREFIX}{token}", str(path)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as err:
        raise SubmissionError(f"{what}: sbatch failed: {err}") from None
    if result.returncode != 0:
        why = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise SubmissionError(f"{what}: sbatch failed: {why}")
    return result.stdout.strip().split(";")[0]


def check_recipes(runs: list[Run], reconfigure: bool) -> None:
    """SpecError naming the fields, for the first run whose recipe (the fields of pretrain and lincls
    that define a training trajectory, sogclr/contract/config.py) differs from the one in its config.yaml: a
    resumed run would continue under another schedule. Resources may change."""
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


def reconfigure_runs(
    runs: list[Run], where: dict[str, dict[str, PhaseStanding]], code: dict[str, Any], console: Console
) -> list[str]:
    """`--reconfigure`: rewrite the config.yaml of every existing run that is not active and whose config
    changed; a run with a queued or running job is left as it is (its next attempt would read the new
    config), and named. Returns the names of the runs rewritten."""
    rewritten, left = [], []
    for run in runs:
        path = run.files.config
        if not path.is_file() or not _config_changed(load_run_config(path), run.config):
            continue
        if any(standing.active for standing in where[run.name].values()):
            left.append(run.name)
        else:
            write_run_config(run, code)
            rewritten.append(run.name)
    if rewritten:
        console.print(f"--reconfigure: rewrote the config of {', '.join(rewritten)}", highlight=False)
    if left:
        console.print(
            f"[yellow]warning:[/] --reconfigure: left the config of {', '.join(left)}: a job of theirs "
            "is queued or running (cancel it, or reconfigure once it has ended)",
            highlight=False,
        )
    return rewritten


def _config_changed(recorded: RunConfig, config: RunConfig) -> bool:
    """Whether anything but provenance (`meta`: code, resources, sweep point) differs."""
    return recorded.model_dump(mode="json", exclude={"meta"}) != config.model_dump(
        mode="json", exclude={"meta"}
    )


def job_name(run: Run, phase: str) -> str:
    """The job's name in SLURM: what `status` and `cancel` check an id against before using it."""
    return f"{run.config.meta.get('sweep', 'sogclr')}.{run.name}.{phase}"


def array_name(run: Run, phase: str) -> str:
    """The name of the sweep's `phase` arrays in SLURM, which each of their tasks has."""
    return f"{run.config.meta.get('sweep', 'sogclr')}.{phase}"


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
