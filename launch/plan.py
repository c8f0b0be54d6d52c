"""What a submission submits: for each run, the phases it still needs given where it stands, and the
order and grouping in which they go (one array per phase for runs with identical resources)."""

from __future__ import annotations

from dataclasses import dataclass

from jobs.slurm_client import UNKNOWN
from launch.configs import phase_resources
from launch.spec import Run
from launch.standing import PRUNED, PhaseStanding


@dataclass(frozen=True)
class Plan:
    """What to submit for one run: its phases, and the live pretraining job its evaluation waits on."""

    run: Run
    phases: list[str]
    after: str | None = None


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
