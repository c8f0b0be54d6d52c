"""Live progress of `--local` runs on a terminal 80 columns wide: every run's name whole.

The runs are a real spec's; each has one step record and a state.json as its trainer writes them (the
keys of sogclr/pretrain.py's step log), so the display is drawn from the files it polls in a real sweep.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

from rich.console import Console

from launch.inspect.progress import LiveProgress
from launch.spec import Run, expand, load_spec
from sogclr.contract.state import update_state
from testkit.tiny import write_tiny_spec

GAMMA_SWEEP = {"product": {"gamma": [0.1, 0.99], "temperature": [0.07, 0.5], "batch_size": [64, 256]}}


def log_a_step(run: Run, step: int, total_steps: int) -> None:
    files = run.files.pretrain
    files.metrics.parent.mkdir(parents=True, exist_ok=True)
    record = {"step": step, "epoch": 3, "loss": 0.04272, "objective": 0.02999, "images_per_s": 166.2}
    files.metrics.write_text(json.dumps({**record, "time": time.time()}) + "\n")
    update_state(files.state, status="running", step=step, epoch=3, total_steps=total_steps)


def drawn(live: LiveProgress, width: int) -> list[str]:
    """The display's lines as a terminal `width` columns wide shows them."""
    out = io.StringIO()
    Console(file=out, width=width, force_terminal=True, color_system=None).print(
        live.bar.make_tasks_table(live.bar.tasks)
    )
    return out.getvalue().splitlines()


def test_at_80_columns_no_run_name_is_cut_and_the_details_wrap(tmp_path: Path):
    spec = write_tiny_spec(tmp_path, "gamma_sweep", pretrain={"epochs": 8}, sweep=GAMMA_SWEEP)
    runs = expand(load_spec(spec))
    names = [run.name for run in runs]
    assert max(map(len, names)) >= 20  # bs256-gamma0.99-t0.07: cut to `gamma…` before
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    with LiveProgress(console, runs) as live:
        for run in runs:
            live.phase_started(run, "pretrain")
            log_a_step(run, 35, 88)
            live.phase_ended(run)  # draws the phase's last record
        lines = drawn(live, 80)
    starts = [line.split()[0] for line in lines if line and not line.startswith(" ")]
    assert starts == names  # one line per run, each beginning with its whole name
    assert all(len(line) <= 80 for line in lines)
    for name in names:
        first = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
        assert lines[first].split()[1] == "pretrain" and "35/88" in lines[first]
        detail = " ".join(line.strip() for line in lines[first : first + 4])
        assert "epoch 4/8" in detail and "166 img/s" in detail  # wrapped, not cut
