"""`sogclr-submit`: submit a sweep, or inspect it.

sogclr-submit SPEC [--dry-run [-v]] [--set a.b=value ...]     submit to SLURM (or --local, --debug)
sogclr-submit SPEC --resume-pruned RUN ...                      continue pruned runs to the end
sogclr-submit status SPEC                                      where every run stands
sogclr-submit report SPEC [--format table|md|csv|json] [--seeds]  what every run reached, and figures
sogclr-submit cancel SPEC [--run NAME]                         cancel this sweep's jobs
sogclr-submit schema                                           JSON Schema of the spec
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console

from launch.spec import (
    PruneSpec,
    Run,
    SpecError,
    SweepSpec,
    check_data_dirs,
    check_prune_records,
    expand,
    load_spec,
    resuming_pruned,
)
from launch.table import print_table
from sogclr.contract.cli import add_override_argument
from sogclr.contract.state import read_state

COMMANDS = ("submit", "status", "report", "cancel", "schema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sogclr-submit", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit every run of a sweep (the default command)")
    _add_spec_arguments(submit)
    submit.add_argument("--dry-run", action="store_true", help="validate and list the runs; submit nothing")
    submit.add_argument("-v", "--verbose", action="store_true", help="with --dry-run: show sbatch scripts")
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run on this machine instead of SLURM")
    mode.add_argument("--debug", action="store_true", help="one run in-process, debugger on exception")
    submit.add_argument("--parallel", type=int, default=1, metavar="N", help="--local: runs at once")
    submit.add_argument(
        "--preempt-after", type=float, metavar="SECONDS", help="--local: send the warning signal after"
    )
    submit.add_argument(
        "--resubmit-failed", action="store_true", help="also resubmit runs that failed or were cancelled"
    )
    submit.add_argument("--run", metavar="NAME", help="only this run (--debug: which run to debug)")
    submit.add_argument(
        "--resume-pruned",
        nargs="+",
        default=[],
        metavar="RUN",
        help="continue these pruned runs from the rung that stopped them to the end, then evaluate them",
    )
    submit.add_argument(
        "--reconfigure",
        action="store_true",
        help="rewrite the config of runs whose recipe differs from the one they were started with",
    )
    submit.add_argument(
        "--reindex",
        action="store_true",
        help="walk the datasets' trees again and rewrite the sweep's indexes (the data really changed)",
    )
    submit.add_argument(
        "--no-snapshot",
        action="store_true",
        help="jobs run the code installed when each attempt starts, not the code frozen now",
    )

    status = commands.add_parser("status", help="show the state of every run")
    _add_spec_arguments(status)

    report = commands.add_parser("report", help="table of what every run reached, and figures")
    _add_spec_arguments(report)
    report.add_argument(
        "--format", choices=("table", "md", "csv", "json"), default="table", help="how to print the table"
    )
    report.add_argument("--no-figures", action="store_true", help="only the table: no PNGs")
    report.add_argument(
        "--seeds",
        action="store_true",
        help="one row per point of the sweep but its seed: mean ± sd over the seeds (pretrain.seed swept)",
    )

    cancel = commands.add_parser("cancel", help="cancel this sweep's SLURM jobs")
    _add_spec_arguments(cancel)
    cancel.add_argument("--run", metavar="NAME", help="only this run")

    commands.add_parser("schema", help="print the JSON Schema of a spec file")
    return parser


def _add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", help="sweep spec (YAML)")
    add_override_argument(parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "submit")  # `sogclr-submit SPEC` means submit
    args = build_parser().parse_args(argv)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: no reason to squeeze tables into 80 columns
        console = Console(width=200)
    try:
        return COMMAND_HANDLERS[args.command](args, console)
    except SpecError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        return 2


def _load(args: argparse.Namespace) -> tuple[SweepSpec, list[Run]]:
    spec = load_spec(args.spec, args.overrides)
    runs = expand(spec)
    if getattr(args, "run", None):
        runs = [run for run in runs if run.name == args.run]
        if not runs:
            names = ", ".join(run.name for run in expand(spec))
            raise SpecError(f"--run {args.run}: no such run in this sweep (runs: {names})")
    return spec, runs


def cmd_submit(args: argparse.Namespace, console: Console) -> int:
    spec, runs = _load(args)
    refuse_unpruned(runs, args.resume_pruned)
    runs = resuming_pruned(runs, [*args.resume_pruned, *continued(runs)])
    check_prune_records(spec, runs)
    problems = check_data_dirs(runs)
    if args.dry_run:
        for problem in problems:
            console.print(f"[yellow]warning:[/] {problem}", highlight=False)
        print_runs(spec, runs, console, verbose=args.verbose)
        return 0
    if problems:
        raise SpecError(problems[0])
    from launch.datasets import check_staging_fits, index_datasets  # (tarfile, hashing): submission only

    runs = index_datasets(spec, runs, rebuild=args.reindex)
    if args.debug or args.local:
        from launch import local  # heavy imports (torch) only to run here

        if args.debug:
            return local.run_debug(spec, runs[0], reconfigure=args.reconfigure)
        return local.run_local(
            spec,
            runs,
            parallel=args.parallel,
            preempt_after=args.preempt_after,
            console=console,
            reconfigure=args.reconfigure,
        )
    check_staging_fits(runs)
    from launch import submit  # heavy imports (submitit) only when really submitting

    return submit.submit_sweep(
        spec,
        runs,
        resubmit_failed=args.resubmit_failed,
        console=console,
        snapshot=not args.no_snapshot,
        reconfigure=args.reconfigure,
    )


def refuse_unpruned(runs: list[Run], names: list[str]) -> None:
    """SpecError for a `--resume-pruned` run that is not pruned now: continuing it would exempt it from
    halving for good."""
    from launch.standing import pruned

    for run in runs:
        if run.name in names and not pruned(run):
            status = read_state(run.files.pretrain.state).get("status", "not started")
            raise SpecError(f"--resume-pruned {run.name}: not pruned (its pretraining is {status})")


def continued(runs: list[Run]) -> list[str]:
    """The runs continued after pruning before: each stays without pruning to its end."""
    from launch.standing import continued_after_pruning

    return [run.name for run in runs if continued_after_pruning(run)]


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from launch.inspect import status

    spec, runs = _load(args)
    return status.show_status(spec, runs, console)


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from launch.inspect import report

    spec, runs = _load(args)
    return report.show_report(spec, runs, console, args.format, figures=not args.no_figures, seeds=args.seeds)


def cmd_cancel(args: argparse.Namespace, console: Console) -> int:
    from launch import cancel

    spec, runs = _load(args)
    return cancel.cancel(spec, runs, console)


def cmd_schema(args: argparse.Namespace, console: Console) -> int:
    print(json.dumps(SweepSpec.model_json_schema(), indent=2))
    return 0


COMMAND_HANDLERS = {
    "submit": cmd_submit,
    "status": cmd_status,
    "report": cmd_report,
    "cancel": cmd_cancel,
    "schema": cmd_schema,
}


def print_runs(spec: SweepSpec, runs: list[Run], console: Console, verbose: bool = False) -> None:
    """The dry-run table: what would be submitted, and where it would write."""
    rows = []
    for run in runs:
        point = ", ".join(f"{key}={value}" for key, value in run.point.items()) or "-"
        resources = f"{run.slurm.nodes} x {run.slurm.gpus_per_node or 'cpu'}"
        lincls = "-" if run.lincls_slurm is None else f"{run.lincls_slurm.nodes} x {run.lincls_slurm.time}"
        rows.append((run.name, point, resources, run.slurm.time, lincls, str(run.run_dir)))
    columns = ("run", "swept values", "nodes x gpus", "time", "linear eval", "run directory")
    print_table(console, f"{spec.name}: {len(runs)} run(s), nothing submitted", columns, rows)
    if (prune := spec.sweep.prune) is not None:
        rungs = sorted({tuple(run.config.prune.rungs) for run in runs if run.config.prune is not None})
        at = " or ".join(", ".join(map(str, epochs)) for epochs in rungs) or "- (every run continued)"
        console.print(f"pruning: {prune.metric} after epochs {at}; {prune_rule(prune)}", highlight=False)
        console.print(f"records in {spec.prune_records}", highlight=False)
    if verbose:
        from launch.scripts import describe_submission

        console.print(describe_submission(runs), highlight=False, markup=False, soft_wrap=True)


def prune_rule(prune: PruneSpec) -> str:
    """Which rule runs, in words (sogclr/contract/rungs.py)."""
    arrival = (
        f"at a rung a run continues if it is among the best max(1, n // {prune.eta}) of the n runs "
        "recorded there so far (the first arrival always does)"
    )
    if not prune.promote:
        return f"{arrival}; a run stopped there is stopped for good"
    return (
        f"{arrival}; a run stopped there is paused, and continued from its checkpoint as soon as later "
        f"arrivals put it among the rung's best max(1, n // {prune.eta}) (promotion)"
    )


if __name__ == "__main__":
    sys.exit(main())
