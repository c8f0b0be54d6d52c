"""Job arrays without SLURM: which runs share an array, the array scripts, and how array tasks are named
and matched (squeue/sacct records, `aftercorr` dependents)."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.array import task_job
from jobs.slurm import waits_on
from jobs.slurm_client import task_ids
from launch.arrays import array_range, link_tasks
from launch.plan import Plan, batches
from launch.scripts import describe_submission
from launch.spec import SpecError, expand, load_spec
from testkit.tiny import write_tiny_spec


def plans(tmp_path: Path, **sections) -> list[Plan]:
    runs = expand(load_spec(write_tiny_spec(tmp_path, "s", **sections)))
    return [Plan(run, run.phases) for run in runs]


def names(groups: list[list[Plan]]) -> list[list[str]]:
    return [[plan.run.name for plan in group] for group in groups]


def test_runs_with_identical_resources_share_one_array_split_at_max_array_size(tmp_path: Path):
    sweep = {"product": {"gamma": [0.1, 0.3, 0.5, 0.7, 0.9]}}
    assert names(batches(plans(tmp_path, sweep=sweep), 1001)) == [["gamma0.1", "gamma0.3", "gamma0.5",
                                                                    "gamma0.7", "gamma0.9"]]  # fmt: skip
    assert [len(group) for group in batches(plans(tmp_path, sweep=sweep), 2)] == [2, 2, 1]
    assert [len(group) for group in batches(plans(tmp_path, sweep=sweep), 0)] == [1] * 5  # arrays disabled
    single = plans(tmp_path, sweep=sweep, slurm={"arrays": False})
    assert [len(group) for group in batches(single, 1001)] == [1] * 5


def test_a_sweep_whose_points_differ_in_resources_becomes_one_array_per_resource_group(tmp_path: Path):
    # the batch-size study: nodes move with the batch size
    sweep = {
        "zip": {"batch_size": [64, 128, 64, 128], "slurm.nodes": [1, 2, 1, 2], "gamma": [0.1, 0.2, 0.3, 0.4]}
    }
    groups = batches(plans(tmp_path, sweep=sweep), 1001)
    assert [[plan.run.slurm.nodes for plan in group] for group in groups] == [[1, 1], [2, 2]]
    # evaluations whose own sbatch failed, waiting on tasks of a live pretraining array, go as one array
    # (task i aftercorr on that array's task i); one waiting on a live single job goes alone (afterok)
    first, second, third = plans(tmp_path, sweep={"product": {"gamma": [0.5, 0.9, 0.7]}})
    waiting = [Plan(first.run, ["lincls"], after="12_3"), Plan(second.run, ["lincls"], after="12_7"),
               Plan(third.run, ["lincls"], after="15")]  # fmt: skip
    assert names(batches(waiting, 1001)) == [["gamma0.5", "gamma0.9"], ["gamma0.7"]]


def test_array_range_throttles_only_below_the_number_of_tasks():
    assert array_range(10, None) == "0-9"
    assert array_range(10, 4) == "0-9%4"
    assert array_range(3, 4) == "0-2"
    assert array_range(2, None, [3, 7]) == "3,7"  # evaluations of tasks 3 and 7 of a live array


def test_max_parallel_needs_arrays_and_the_evaluation_cannot_leave_its_array(tmp_path: Path):
    with pytest.raises(SpecError, match="slurm: max_parallel throttles job arrays"):
        expand(load_spec(write_tiny_spec(tmp_path, "s", slurm={"arrays": False, "max_parallel": 2})))
    with pytest.raises(SpecError, match=r"lincls\.slurm\.arrays: unknown key"):
        load_spec(write_tiny_spec(tmp_path, "s", lincls={"slurm": {"arrays": False}}))


def test_dry_run_shows_the_array_scripts_chained_task_by_task(tmp_path: Path):
    sweep = {"product": {"gamma": [0.5, 0.9, 0.7]}}
    runs = [plan.run for plan in plans(tmp_path, sweep=sweep, slurm={"max_parallel": 2})]
    text = describe_submission(runs)
    pretrain, lincls = text.split("# --- lincls: sbatch script of the array")
    tasks = f"{tmp_path}/runs/s/arrays/pretrain-<token>"
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --job-name=s.pretrain", "#SBATCH --requeue",
                 f"#SBATCH --output='{tasks}/%a/slurm/%A_%a_0_log.out'", f"-m jobs.array '{tasks}'",
                 f"#   2: gamma0.7 -> {tmp_path}/runs/s/gamma0.7"):  # fmt: skip
        assert line in pretrain
    assert "#SBATCH --dependency='aftercorr:<pretraining array id>'" in lincls
    assert "#SBATCH --job-name=s.lincls" in lincls and "-m sogclr.lincls" in lincls
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_a_task_runs_the_run_its_link_names(tmp_path: Path):
    runs = [plan.run for plan in plans(tmp_path, sweep={"product": {"gamma": [0.5, 0.9]}})]
    tasks = link_tasks(tmp_path / "runs" / "s", "pretrain", runs)
    assert (runs[1].run_dir / "slurm").is_dir()  # SLURM writes the task's logs there
    job = task_job(tasks, {"phase": "pretrain", "nodes": 1, "ranks_per_node": 1, "cpus_per_task": 1,
                           "max_requeues": 2}, 1)  # fmt: skip
    assert job.run_dir == runs[1].run_dir and job.phase == "pretrain"


def test_squeue_and_sacct_records_name_jobs_tasks_and_ranges_of_tasks():
    assert task_ids("12") == ["12"]
    assert task_ids("12_3") == ["12_3"]
    assert task_ids("12_[0-2,7%2]") == ["12_0", "12_1", "12_2", "12_7"]


@pytest.mark.parametrize(
    "dependent, dependency, job_id, expected",
    [
        ("20_1", "aftercorr:19_*(unfulfilled)", "19_1", True),
        ("20_0", "aftercorr:19_*(unfulfilled)", "19_1", False),  # another task's evaluation
        ("20_1", "aftercorr:190_*(unfulfilled)", "19_1", False),
        ("31", "afterok:19_1(unfulfilled)", "19_1", True),
        ("31", "afterok:19_10(unfulfilled)", "19_1", False),
        ("31", "afterok:7(unfulfilled)", "7", True),
        ("31", "afterok:77(unfulfilled)", "7", False),
        ("20_7", "aftercorr:7_*(unfulfilled)", "7", False),  # a single job has no corresponding task
        ("32", "(null)", "7", False),
    ],
)  # fmt: skip
def test_only_the_jobs_and_the_task_waiting_on_a_job_are_its_dependents(
    dependent: str, dependency: str, job_id: str, expected: bool
):
    assert waits_on(dependent, dependency, job_id) is expected
