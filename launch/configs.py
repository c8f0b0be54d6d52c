"""The run configs the launcher writes (`<run_dir>/config.yaml`, with provenance) and the checks made on
them before anything is submitted or run: a changed recipe is refused, `--reconfigure` rewrites it."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from launch.spec import Run, SlurmConfig, SpecError
from launch.standing import PhaseStanding
from sogclr.contract.config import RunConfig, dump_run_config, load_run_config, recipe_differences


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
