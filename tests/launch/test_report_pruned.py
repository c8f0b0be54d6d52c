"""What a user sees of a pruned sweep: `report` (standing with the rung, the hours pruning saved, the
figure that marks where runs stopped), `status` (the rung each run is at) and the live progress lines.

A real tiny sweep pruned in --local (testkit/tiny.py's runs at batch 128, 11 steps an epoch, kNN after
every epoch on a 300-image bank): three temperatures, 2 epochs, one rung after epoch 1, eta 2, one run
after another. The first arrival always continues; which of the others stop is the rule's business
(tests/sogclr/training/test_prune.py): every display is checked against the decision records the runs wrote.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from launch import cli
from launch.spec import Run, expand, load_spec
from sogclr.contract.rungs import RungRecords
from sogclr.contract.state import read_state
from testkit.tiny import write_tiny_spec
from tests.launch.test_report import aligned_table

pytestmark = pytest.mark.xdist_group("report_pruned")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Run], str]:
    """The spec, its runs, and what --local printed while running them."""
    directory = tmp_path_factory.mktemp("pruned")
    spec = write_tiny_spec(
        directory,
        "halving",
        pretrain={"epochs": 2, "batch_size": 128, "knn_every_epochs": 1, "knn_subset": 300},
        sweep={"product": {"temperature": [0.5, 0.1, 0.2]}, "prune": {"first_rung": 1, "eta": 2}},
    )
    capture = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        patch.setattr("sys.stdout", capture)
        assert cli.main([str(spec), "--local"]) == 0
    return spec, expand(load_spec(spec)), capture.getvalue()


def decisions(run: Run) -> dict:
    return RungRecords(run.config.prune.records, 1).decision(run.run_dir.name)


def test_the_report_shows_where_runs_stopped_and_what_stopping_saved(
    sweep: tuple[Path, list[Run], str], capsys: pytest.CaptureFixture
):
    spec, runs, _ = sweep
    stopped = [run.name for run in runs if not decisions(run)["continue"]]
    assert stopped and runs[0].name not in stopped  # the first arrival always continues
    assert cli.main(["report", str(spec), "--format", "json", "--no-figures"]) == 0
    out = capsys.readouterr()
    rows = {row["run"]: row for row in json.loads(out.out)}
    for run in runs:
        row = rows[run.name]
        if run.name in stopped:
            assert row["standing"] == "pruned at epoch 1" and row["pruned_at"] == 1
            assert row["epochs_done"] == 1 and row["linear_top1"] is None and row["hours_saved"] > 0
        else:
            assert row["standing"] == "done" and row["pruned_at"] is None and row["hours_saved"] is None
    assert f"pruning: {len(stopped)} of 3 run(s) stopped early" in out.err  # the note, off stdout

    assert cli.main(["report", str(spec), "--format", "csv"]) == 0
    table = {line["run"]: line for line in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert all(table[name]["hours"].endswith(" saved)") for name in stopped)
    figure = load_spec(spec).directory / "report" / "rungs-knn_top1.png"
    with Image.open(figure) as image:
        image.load()
        assert image.format == "PNG" and image.width > 100


def test_status_and_progress_show_the_rung_each_run_is_at(
    sweep: tuple[Path, list[Run], str], capsys: pytest.CaptureFixture
):
    spec, runs, printed = sweep
    assert cli.main(["status", str(spec)]) == 0
    status = aligned_table(capsys.readouterr().out.splitlines()[1:])
    for run in runs:
        pruned = not decisions(run)["continue"]
        assert status[run.name]["rung"] == ("pruned at 1" if pruned else "kept at 1")
        assert status[run.name]["pretraining"] == ("pruned" if pruned else "done")
        assert status[run.name]["epochs"] == ("1/2" if pruned else "2/2")
        assert status[run.name]["steps"] == ("11/22" if pruned else "22/22")
        # the live lines (not a terminal: plain) end the phase with where the run stood then: a stopped
        # run is paused until the verdicts given after its attempt (promotion), closed by the last one
        last = [line for line in printed.splitlines() if line.startswith(f"{run.name} pretrain: step")][-1]
        assert last.endswith("rung: paused at 1" if pruned else "rung: kept at 1")
        assert read_state(run.files.pretrain.state)["status"] == ("pruned" if pruned else "done")
