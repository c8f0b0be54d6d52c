"""The login side, cold: wall time and peak memory of `sogclr-submit` commands on a 1,000-run sweep, each in a
fresh interpreter as a user runs them, against the code of a baseline commit measured in the same run.

The sweep is the tiny digits spec (testkit/tiny.py) over 10 gammas x 10 temperatures x 10 seeds, nothing
submitted: `status` and `report` read 1,000 run directories (and ask SLURM only about recorded jobs, of
which there are none, and the partitions' grace times), `cancel` finds nothing to cancel, `--dry-run`
expands and validates. Wall and CPU time (user + system) are the best of `--repeats`; on a loaded
machine the CPU time is the steadier figure. Peak memory is the command's own maximum resident set
(wait4). The baseline is `git archive BASELINE`, run from its own directory.

With `--metrics-lines N`, every run directory holds a metrics.jsonl of N logged steps without a kNN
record, as a sweep in training does (status looks for each run's last loss and last kNN top-1 there).

    eval "$(scripts/local-slurm env)"   # the local cluster: status asks scontrol for grace times
    python benchmarks/login.py [--baseline 5e25c03] [--repeats 3] [--metrics-lines 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from launch.spec import expand, load_spec  # noqa: E402
from testkit.tiny import write_tiny_spec  # noqa: E402

COMMANDS = {
    "status": ["status", "{spec}"],
    "report (table)": ["report", "{spec}", "--format", "csv", "--no-figures"],
    "cancel (nothing to cancel)": ["cancel", "{spec}"],
    "--dry-run": ["{spec}", "--dry-run"],
}


def checkout(revision: str, directory: Path) -> Path:
    """The tree of `revision`, written under `directory`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return directory


def cold_run(code: Path, argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak MiB) of `python -m launch.cli ARGV` with `code` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "launch.cli", *argv], cwd=code, env=env, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(process.pid, 0)
    took = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode not in (0, 1):  # 1: cancel and status say when SLURM could not be asked
        sys.exit(f"{argv} failed with exit status {process.returncode} under {code}")
    return took, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024  # KiB on Linux


def write_metrics(spec: Path, lines: int) -> None:
    """A metrics.jsonl of `lines` logged steps (no kNN record) in the directory of every run of `spec`."""
    record = {"epoch": 0, "loss": 4.1, "objective": -0.2, "lr": 0.1, "gamma": 0.9, "images_per_s": 900.0}
    text = "".join(json.dumps({"step": step, **record}) + "\n" for step in range(lines))
    for run in expand(load_spec(spec)):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "metrics.jsonl").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", default="5e25c03", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--metrics-lines", type=int, default=0, help="logged steps in each run directory")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        axes = {"gamma": [round(0.1 * i, 1) for i in range(1, 11)], "seed": list(range(10))}
        axes["temperature"] = [round(0.05 * i, 2) for i in range(1, 11)]
        sweep = {"product": axes}
        spec = str(write_tiny_spec(work, "login", sweep=sweep))
        if args.metrics_lines:
            write_metrics(Path(spec), args.metrics_lines)
        trees = {"before": checkout(args.baseline, work / "before"), "after": ROOT}
        print(f"1,000 runs; best of {args.repeats} cold runs; baseline {args.baseline}\n")
        print(f"{'':<28} {'wall s':^21} {'CPU s':^21} {'peak MiB':^16}")
        print(f"{'command':<28}" + " before  after      x" * 2 + " before  after")
        for label, template in COMMANDS.items():
            argv = [part.format(spec=spec) for part in template]
            best = {}
            for name, code in trees.items():
                runs = [cold_run(code, argv) for _ in range(args.repeats)]
                best[name] = [min(run[i] for run in runs) for i in range(3)]
            (w0, c0, m0), (w1, c1, m1) = best["before"], best["after"]
            times = f"{w0:6.2f} {w1:6.2f} {w0 / w1:6.1f} {c0:6.2f} {c1:6.2f} {c0 / c1:6.1f}"
            print(f"{label:<28} {times} {m0:6.0f} {m1:6.0f}")


if __name__ == "__main__":
    main()
