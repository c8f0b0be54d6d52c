"""Submitting and inspecting a large sweep: job arrays against one job per run, on a real SLURM cluster.

A sweep of tiny runs (gamma x temperature x lr, 1,000 points by default) is submitted held, so that
nothing starts, once as arrays (the default) and once with `slurm.arrays: false` (the baseline); then
`status` runs on each, and everything is cancelled. Wall times are measured in this process (imports
excluded); SLURM commands are counted by the project's one SLURM client (jobs/slurm_client.py), which
logs each call to the file SOGCLR_SLURM_CALL_LOG names.
Then the calls of `status` while an sbatch whose reply was lost is pending (its token is looked up).

    eval "$(scripts/local-slurm env)"   # the local cluster (scripts/local-slurm up)
    python benchmarks/arrays.py [--runs-per-axis 10]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.slurm_calls import logged_calls  # noqa: E402
from jobs.slurm_client import CALL_LOG_ENV  # noqa: E402
from launch import cli, submit  # noqa: E402, F401  (imported before anything is timed)
from launch.manifest import add_pending, new_token, read_manifest, write_manifest  # noqa: E402
from testkit.tiny import write_tiny_spec  # noqa: E402

COUNTED = ("sbatch", "squeue", "sacct", "scontrol", "scancel")


def measured(log: Path, *argv: str) -> tuple[float, Counter]:
    """Wall time of `sogclr-submit ARGV` (output discarded) and the SLURM commands it ran."""
    log.write_text("")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli.main(list(argv))
    took = time.perf_counter() - start
    if status != 0:
        sys.exit(f"sogclr-submit {' '.join(argv)} exited {status}")
    return took, logged_calls(log)[0]


def sweep_spec(directory: Path, name: str, per_axis: int, arrays: bool) -> Path:
    """gamma x temperature x lr, `per_axis` values each, every job held."""
    values = [round(0.05 + 0.9 * i / per_axis, 4) for i in range(per_axis)]
    sweep = {"product": {"gamma": values, "temperature": values, "lr": values}}
    slurm = {"arrays": arrays, "additional": {"hold": True}}  # held: nothing starts
    return write_tiny_spec(directory, name, slurm=slurm, sweep=sweep)


def counts(calls: Counter) -> str:
    return " ".join(f"{command} {calls[command]}" for command in COUNTED if calls[command])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-per-axis", type=int, default=10, help="three axes: n**3 runs")
    args = parser.parse_args()
    runs = args.runs_per_axis**3
    with tempfile.TemporaryDirectory(prefix="bench-arrays-") as tmp:
        directory = Path(tmp)
        log = directory / "calls.log"
        os.environ[CALL_LOG_ENV] = str(log)
        print(f"runs: {runs}, submitted held, then cancelled")
        print(
            f"{'mode':<12} {'submit s':>9} {'status s':>9} {'cancel s':>9}  "
            "SLURM calls (submit | status | cancel)"
        )
        results = {}
        for mode, arrays in (("arrays", True), ("single jobs", False)):
            spec = sweep_spec(directory, mode.replace(" ", "-"), args.runs_per_axis, arrays)
            submit_s, submit_calls = measured(log, str(spec))
            status_s, status_calls = measured(log, "status", str(spec))
            if arrays:
                lost = lost_reply_status(log, spec)
            cancel_s, cancel_calls = measured(log, "cancel", str(spec))
            ids = read_manifest(directory / "runs" / spec.stem)["runs"]
            assert len(ids) == runs
            results[mode] = submit_s
            print(
                f"{mode:<12} {submit_s:9.2f} {status_s:9.2f} {cancel_s:9.2f}  "
                f"{counts(submit_calls)} | {counts(status_calls)} | {counts(cancel_calls)}"
            )
        print(f"submit, single jobs / arrays: {results['single jobs'] / results['arrays']:.1f}x")
        print(f"arrays: status while a lost sbatch reply is pending: {lost}")


def lost_reply_status(log: Path, spec: Path) -> str:
    """Wall time and SLURM calls of `status` while the manifest holds a pending sbatch (a token)."""
    sweep_dir = spec.parent / "runs" / spec.stem
    manifest = read_manifest(sweep_dir)
    add_pending(manifest, new_token(), "pretrain", ["-"], job_name=f"{spec.stem}.pretrain", submitted="-")
    write_manifest(sweep_dir, manifest)  # as an sbatch whose reply was lost leaves it
    took, calls = measured(log, "status", str(spec))
    manifest["pending"] = []
    write_manifest(sweep_dir, manifest)
    return f"{took:.2f} s, {counts(calls)}"


if __name__ == "__main__":
    main()
