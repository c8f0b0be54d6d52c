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

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from jobs import slurm_client
from jobs.attempt import PHASES
from jobs.slurm_client import NEVER_RUNS, UNKNOWN, SlurmError
from launch.arrays import link_tasks, max_array_size
from launch.configs import check_recipes, reconfigure_runs, write_run_config
from launch.manifest import (
    TOKEN_PREFIX,
    add_pending,
    current_job,
    find_submissions,
    new_token,
    read_manifest,
    settle_pending,
    sweep_lock,
    write_manifest,
)
from launch.plan import Plan, batches, phases_to_submit
from launch.scripts import array_name, array_script, job_name, job_script
from launch.snapshot import Snapshot, freeze, live_code
from launch.spec import Run, SweepSpec
from launch.standing import PhaseStanding, reconcile
from launch.table import print_table
from sogclr.contract.state import now

CONFIG_WRITERS = 16  # threads writing an array's run configs


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
        where = reconcile(runs, manifest)
        if lost_replies:
            write_manifest(directory, manifest)  # what the lookup of their tokens settled
        ledger = Ledger(directory, manifest, slurm_client.cluster_name())
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
        except SlurmError as unavailable:
            raise SubmissionError(
                f"{err}; SLURM could not say whether it made the job ({unavailable}): the next "
                "submission looks for it before submitting again"
            ) from None
        if token not in found:
            raise err
        return found[token]


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


def cancel_replaced(plans: list[Plan], where: dict[str, dict[str, PhaseStanding]]) -> None:
    """scancel the queued jobs that the plans replace: evaluations still pending on a pretraining that
    can never complete (clusters without kill_invalid_depend keep them for ever). One scancel in all."""
    stale = [
        standing.job_id
        for plan in plans
        for phase in plan.phases
        if (standing := where[plan.run.name][phase]).state == NEVER_RUNS
    ]
    # a job that ended meanwhile (kill_invalid_depend got there first) is fine; one left is replaced anyway
    slurm_client.scancel(stale)


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


def sbatch_script(path: Path, what: str, token: str) -> str:
    """Submit the batch script at `path`, its comment carrying `token` (see Ledger); the job id, or
    SubmissionError with sbatch's message."""
    try:
        return slurm_client.sbatch(path, f"{TOKEN_PREFIX}{token}")
    except SlurmError as err:
        raise SubmissionError(f"{what}: {err}") from None
