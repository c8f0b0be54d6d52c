"""Where each run of a sweep stands, phase by phase: the one view that submission, status, cancel,
report and local mode share.

It is read from SLURM first (one squeue, then at most one sacct for the ids squeue has forgotten) and
from the run directory when SLURM has forgotten the job; `unknown` when SLURM could not be asked (or the
job was submitted on another cluster): unknown is not forgotten, and nothing acts on it; `not ours` when
the id now names another job (its JobName differs). Both phases of a run that the sweep's successive
halving stopped read `pruned` from its run directory (its job ended COMPLETED; its evaluation was
cancelled, or in local mode never started), until a `--resume-pruned` job of it is queued or runs.

`standings` only reads (it settles lost sbatch replies in the manifest it is given, in memory);
`reconcile` also brings the run directories in line with SLURM, the one write of this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from jobs import slurm_client
from jobs.attempt import PHASES, close_unrecorded_attempt
from jobs.slurm_client import UNKNOWN, SlurmJob
from launch.manifest import current_job, current_submission, lock_if_free, resolve_pending
from launch.spec import Run
from sogclr.contract.state import read_state

# SLURM states of a job that is still queued or may run again. Not `preempted`: a job SLURM requeues
# is PENDING again at once, so a job still PREEMPTED was not requeued (PreemptMode=CANCEL) and is over.
ACTIVE = frozenset(
    "pending running requeued requeue_hold requeue_fed configuring completing suspended resizing "
    "signaling stage_out".split()
)


NOT_SUBMITTED = "not submitted"


PRUNED = "pruned"  # stopped at a rung by the sweep's successive halving: settled, like done


NOT_OURS = "not ours"  # the id now names another job (a reset controller)


@dataclass(frozen=True)
class PhaseStanding:
    job_id: str | None
    state: str  # done | not submitted | unknown | not ours | a SLURM state | the run directory's status
    from_slurm: bool = False
    reason: str | None = None  # why `unknown` or `not ours`
    # the phase's state.json as this standing read it: commands show it without reading it again
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def active(self) -> bool:
        """Queued or running (a run directory that says `running` without a job is not)."""
        return self.from_slurm and self.state in ACTIVE


def phase_done(run: Run, phase: str, state: dict[str, Any] | None = None) -> bool:
    """Whether the phase finished; `state`: its state.json, when the caller has read it already."""
    if phase == "lincls":
        return run.files.lincls.result.is_file()
    state = read_state(PHASES[phase].state_path(run.run_dir)) if state is None else state
    return state.get("status") == "done"


def pruned(run: Run) -> bool:
    """Whether the sweep's successive halving stopped the run (and it has not been continued since)."""
    return read_state(run.files.pretrain.state).get("status") == PRUNED


def continued_after_pruning(run: Run) -> bool:
    """Whether the run was pruned once and continued since (`--resume-pruned`): it is never pruned again,
    also when a later submission resumes it after an interruption."""
    state = read_state(run.files.pretrain.state)
    return "pruned" in state and state.get("status") != PRUNED


def phase_standing(
    run: Run,
    phase: str,
    manifest: dict[str, Any],
    jobs: dict[str, SlurmJob],
    cluster: str | None = None,
    unconfirmed: dict[tuple[str, str], str] | None = None,
    records: dict[str, dict[str, Any]] | None = None,
) -> PhaseStanding:
    """Where one phase stands; `unconfirmed`: (run, phase) -> why, for an sbatch whose reply was lost
    and that SLURM could not be asked about (`resolve_pending`); `records`: phase -> state.json, when
    the caller has read them."""
    records = records or read_records(run)
    standing = _phase_standing(run, phase, manifest, jobs, cluster, unconfirmed or {}, records)
    return replace(standing, record=records[phase])


def read_records(run: Run) -> dict[str, dict[str, Any]]:
    """phase -> its state.json, each read once: status reads those of 1,000s of runs."""
    return {phase: read_state(PHASES[phase].state_path(run.run_dir)) for phase in PHASES}


def _phase_standing(
    run: Run,
    phase: str,
    manifest: dict[str, Any],
    jobs: dict[str, SlurmJob],
    cluster: str | None,
    unconfirmed: dict[tuple[str, str], str],
    records: dict[str, dict[str, Any]],
) -> PhaseStanding:
    submission = current_submission(manifest, run.name, phase)
    job_id = submission["job_id"] if submission else None
    state = records[phase]
    if phase_done(run, phase, state):
        return PhaseStanding(job_id, "done")
    if (why := unconfirmed.get((run.name, phase))) is not None:
        return PhaseStanding(job_id, UNKNOWN, reason=why)
    job = jobs.get(job_id) if job_id else None
    if job is not None and job.state == UNKNOWN:  # (a --resume-pruned job of a pruned run may be running)
        return PhaseStanding(job_id, UNKNOWN, reason=job.reason)
    if submission is not None and (why := other_cluster(submission, cluster)) is not None:
        return PhaseStanding(job_id, UNKNOWN, reason=why)  # it may be running there: never act on it
    if records["pretrain"].get("status") == PRUNED and not (job is not None and job.state in ACTIVE):
        return PhaseStanding(job_id, PRUNED)  # not yet resumed
    if submission is None:
        return PhaseStanding(None, NOT_SUBMITTED)
    if (why := not_ours(submission, job)) is not None:
        return PhaseStanding(job_id, NOT_OURS, reason=why)
    if job is not None:
        return PhaseStanding(job_id, job.state, from_slurm=True)
    return PhaseStanding(job_id, f"{state.get('status', 'never ran')} (run dir)")


def other_cluster(submission: dict[str, Any], cluster: str | None) -> str | None:
    """Why the job is not this cluster's to ask about, or None (also when a cluster cannot say its
    name): a job on another cluster sharing the file system may be training in the run directory."""
    recorded = submission.get("cluster")
    if recorded and cluster and recorded != cluster:
        return f"submitted on cluster {recorded}, this is {cluster}: ask there"
    return None


def not_ours(submission: dict[str, Any], job: SlurmJob | None) -> str | None:
    """Why the recorded id no longer names the job we submitted, or None if it may (records written
    before names were kept are taken as ours)."""
    expected = submission.get("job_name")
    if job is not None and job.name is not None and expected and job.name != expected:
        return f"job {submission['job_id']} is now {job.name!r}, not {expected!r}"
    return None


def standings(runs: list[Run], manifest: dict[str, Any]) -> dict[str, dict[str, PhaseStanding]]:
    """run -> phase -> standing, with one squeue and at most one sacct call for the whole sweep (and
    one squeue more while an sbatch whose reply was lost is pending: `resolve_pending`, which records
    what it finds in `manifest`; a caller holding the sweep's lock writes it). Writes nothing."""
    recorded = any(manifest["runs"].get(run.name) for run in runs)
    cluster = slurm_client.cluster_name() if recorded or manifest.get("pending") else None
    lost = resolve_pending(manifest, cluster, lambda entry: started_job(entry, runs, manifest))
    unconfirmed = {
        (run, entry["phase"]): f"an sbatch's reply was lost, and whether it made the job: {why}"
        for entry in manifest.get("pending", [])
        if (why := lost.get(entry["token"])) is not None
        for run in entry["runs"]
    }
    job_ids = [
        job_id for run in runs for phase in PHASES if (job_id := current_job(manifest, run.name, phase))
    ]
    jobs = slurm_client.slurm_jobs(job_ids)
    where = {}
    for run in runs:
        records = read_records(run)
        where[run.name] = {
            phase: phase_standing(run, phase, manifest, jobs, cluster, unconfirmed, records)
            for phase in PHASES
        }
    return where


def started_job(entry: dict[str, Any], runs: list[Run], manifest: dict[str, Any]) -> str | None:
    """The job a pending sbatch `entry` made, as its runs' directories prove it: an attempt started after
    the sbatch by a job (an array's, for an array) that the manifest does not record for that run. None
    when no run of it has started one. SLURM forgets an ended job after MinJobAge; the run directory
    does not."""
    by_name = {run.name: run for run in runs}
    for name in entry["runs"]:
        if name not in by_name:
            continue
        state = read_state(PHASES[entry["phase"]].state_path(by_name[name].run_dir))
        known = {s["job_id"] for s in manifest["runs"].get(name, {}).get(entry["phase"], [])}
        for attempt in [*state.get("attempts", []), state.get("current_attempt") or {}]:
            task = attempt.get("array_task") or str(attempt.get("job_id", ""))
            job = task.partition("_")[0] if entry.get("array") else task
            if job and task not in known and attempt.get("started", "") >= entry["submitted"]:
                return job
    return None


def reconcile(runs: list[Run], manifest: dict[str, Any]) -> dict[str, dict[str, PhaseStanding]]:
    """`standings`, with every attempt that SLURM has ended for good while its run directory still shows
    it in progress closed (`close_unrecorded_attempt`), so that the run directory agrees with SLURM: under
    the sweep's lock, and only when it is free or ours (`lock_if_free`); else a later command closes it."""
    where = standings(runs, manifest)
    ended = [
        (run, phase, standing.state)
        for run in runs
        for phase, standing in where[run.name].items()
        if standing.from_slurm and standing.state not in ACTIVE and standing.state != "completed"
    ]
    # under the lock: two commands at once would both append the attempt (runs of a sweep share its dir)
    if ended:
        with lock_if_free(ended[0][0].run_dir.parent) as locked:
            if locked:
                for run, phase, slurm_state in ended:
                    path = PHASES[phase].state_path(run.run_dir)
                    if close_unrecorded_attempt(path, slurm_state):
                        where[run.name][phase] = replace(where[run.name][phase], record=read_state(path))
    return where
