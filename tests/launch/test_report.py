"""`sogclr-submit report`: the rows and the figures' numbers of a real tiny sweep, run here (--local).

Three of its four runs are trained (one epoch each, with the exact global objective logged at the epoch's
end), one is left unstarted. The kNN monitor is not on this branch: the fixture appends an epoch-end
record with `knn_top1` / `knn_top5`, as that monitor writes them, to one real run's metrics.jsonl.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from launch import cli
from launch.inspect.figures import write_figures
from launch.inspect.results import RunRow, attempt_seconds, collect, numeric_fields, read_records, top1_series
from launch.manifest import read_manifest
from launch.spec import Run, expand, load_spec
from launch.standing import standings
from sogclr.contract.state import read_state
from testkit.login import login_command
from testkit.tiny import STEPS_PER_EPOCH, write_tiny_spec

TRAINED = ("bs64-sogclr", "bs64-simclr", "bs128-sogclr")
UNSTARTED = "bs128-simclr"
KNN = {"knn_top1": 71.25, "knn_top5": 96.5}
KNN_RUN = "bs128-sogclr"

pytestmark = pytest.mark.xdist_group("report")  # one worker trains the sweep once for every test


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Run]]:
    """The spec and its runs, three of them trained (pretraining on 2 CPUs, evaluation on 1)."""
    directory = tmp_path_factory.mktemp("report")
    spec = write_tiny_spec(
        directory,
        "study",
        slurm={"cpus_per_task": 2},
        pretrain={"objective_every_epochs": 1, "objective_subset": 64},
        lincls={"slurm": {"cpus_per_task": 1}},
        sweep={"product": {"loss": ["sogclr", "simclr"], "batch_size": [64, 128]}},
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # one thread whatever the spec asks: a shared 2-core machine
        for name in TRAINED:
            assert cli.main([str(spec), "--local", "--run", name]) == 0
    runs = expand(load_spec(spec))
    # what the kNN monitor (another branch) writes after an epoch, appended to one real run's file
    files = next(run for run in runs if run.name == KNN_RUN).files.pretrain
    last = read_records(files.metrics)[-1]
    with open(files.metrics, "a") as f:
        f.write(json.dumps({"step": last["step"], "epoch": 0, **KNN, "time": last["time"]}) + "\n")
    return spec, runs


def rows_of(spec: Path, runs: list[Run]) -> dict[str, RunRow]:
    directory = load_spec(spec).directory
    return {row.run: row for row in collect(runs, standings(runs, read_manifest(directory)))}


def test_rows_hold_what_each_run_reached_and_nothing_for_an_unstarted_run(sweep: tuple[Path, list[Run]]):
    spec, runs = sweep
    rows = rows_of(spec, runs)
    for name in TRAINED:
        row, run = rows[name], next(run for run in runs if run.name == name)
        result = read_state(run.files.lincls.result)
        steps = [r for r in read_records(run.files.pretrain.metrics) if "objective" in r]
        assert (row.standing, row.epochs_done, row.epochs) == ("done", 1, 1)
        assert (row.linear_top1, row.linear_top5) == (result["top1"], result["top5"])
        assert row.objective == steps[-1]["objective"] and row.global_objective is not None
        assert (row.knn_top1, row.knn_top5) == ((71.25, 96.5) if name == KNN_RUN else (None, None))
        assert row.requeues == 0
        # hours: each phase's attempts x its CPUs (pretraining 2, evaluation 1)
        pretrain_s, lincls_s = (
            sum(attempt_seconds(read_state(files.state)["attempts"]))
            for files in (run.files.pretrain, run.files.lincls)
        )
        assert row.wall_s == pretrain_s + lincls_s > 0
        assert row.hours == pytest.approx((2 * pretrain_s + lincls_s) / 3600) and row.hours_unit == "CPU-h"

    unstarted = rows[UNSTARTED]
    assert unstarted.standing == "pretrain not submitted" and unstarted.epochs_done == 0
    assert unstarted.objective is unstarted.linear_top1 is unstarted.linear_top5 is None
    assert (unstarted.wall_s, unstarted.hours) == (0, 0)


def test_the_top1_figure_has_one_line_per_loss_against_batch_size(sweep: tuple[Path, list[Run]]):
    spec, runs = sweep
    rows = rows_of(spec, runs)
    assert numeric_fields(list(rows.values())) == ["pretrain.batch_size"]  # loss is not a number
    series = {line.label: line for line in top1_series(list(rows.values()), "pretrain.batch_size")}
    assert set(series) == {"sogclr", "simclr"}
    assert series["sogclr"].x == [64, 128]
    assert series["sogclr"].y == [rows["bs64-sogclr"].linear_top1, rows["bs128-sogclr"].linear_top1]
    assert (series["simclr"].x, series["simclr"].y) == ([64], [rows["bs64-simclr"].linear_top1])  # not bs128


def test_training_curves_follow_the_metrics_and_a_knn_record(sweep: tuple[Path, list[Run]]):
    spec, runs = sweep
    run = next(run for run in runs if run.name == KNN_RUN)
    records = read_records(run.files.pretrain.metrics)
    total = read_state(run.files.pretrain.state)["total_steps"]
    rows = rows_of(spec, runs)
    curves = rows[KNN_RUN].curves
    steps = [r for r in records if "objective" in r]
    assert curves["objective"].x == [r["step"] / total for r in steps] and curves["objective"].x[-1] == 1
    assert curves["objective"].y == [r["objective"] for r in steps]
    assert curves["knn_top1"].x == [1] and curves["knn_top1"].y == [KNN["knn_top1"]]
    assert curves["global_objective"].y == [r["global_objective"] for r in records if "global_objective" in r]
    assert "knn_top1" not in rows["bs64-sogclr"].curves and rows[UNSTARTED].curves == {}

    paths = write_figures(list(rows.values()), spec.parent / "figures")
    assert sorted(path.name for path in paths) == sorted(
        ["top1-batch_size.png", *(f"curves-{name}.png" for name in TRAINED)]
    )
    for path in paths:
        with Image.open(path) as image:
            image.load()  # decodes the whole PNG
            assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_report_prints_md_csv_and_json_and_writes_figures(
    sweep: tuple[Path, list[Run]], capsys: pytest.CaptureFixture
):
    spec, runs = sweep
    rows = rows_of(spec, runs)
    assert cli.main(["report", str(spec), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    by_run = {entry["run"]: entry for entry in printed}
    assert by_run["bs64-sogclr"]["linear_top1"] == rows["bs64-sogclr"].linear_top1
    assert by_run[UNSTARTED]["linear_top1"] is None and by_run[UNSTARTED]["objective"] is None
    assert by_run["bs64-sogclr"]["point"] == {"pretrain.batch_size": 64, "pretrain.loss": "sogclr"}

    assert cli.main(["report", str(spec), "--format", "csv", "--no-figures"]) == 0
    table = {line["run"]: line for line in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert table["bs64-simclr"]["linear top-1"] == f"{rows['bs64-simclr'].linear_top1:.2f}"
    assert table[UNSTARTED]["linear top-1"] == table[UNSTARTED]["kNN top-1"] == "-"
    assert table[UNSTARTED]["standing"] == "pretrain not submitted"
    assert table[KNN_RUN]["kNN top-1"] == "71.25" and table["bs64-sogclr"]["kNN top-1"] == "-"  # never 0
    assert table["bs128-sogclr"]["batch_size"] == "128" and table["bs128-sogclr"]["epochs"] == "1/1"

    assert cli.main(["report", str(spec), "--format", "md", "--no-figures"]) == 0
    header, rule, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith("| run | batch_size | loss | standing |") and len(lines) == 4

    assert cli.main(["report", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "linear top-1" in out and "CPU-h" in out
    report_dir = load_spec(spec).directory / "report"
    assert (report_dir / "top1-batch_size.png").is_file() and f"figure(s) in {report_dir}" in out


def test_status_and_report_count_epochs_alike(sweep: tuple[Path, list[Run]], capsys: pytest.CaptureFixture):
    """Epochs completed of all, and steps taken of all: a finished run is 1/1 epochs (and 22/22 steps) in
    both (not the zero-based epoch of its last step record beside a step count)."""
    spec, runs = sweep
    assert cli.main(["status", str(spec)]) == 0
    status = aligned_table(capsys.readouterr().out.splitlines()[1:])
    assert cli.main(["report", str(spec), "--format", "csv", "--no-figures"]) == 0
    report = {line["run"]: line for line in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    for run in runs:
        if run.name in TRAINED:
            steps = STEPS_PER_EPOCH * 64 // run.config.pretrain.batch_size  # 22 at batch 64, 11 at 128
            assert status[run.name]["epochs"] == report[run.name]["epochs"] == "1/1"
            assert status[run.name]["steps"] == f"{steps}/{steps}"
    assert status[UNSTARTED]["epochs"] == report[UNSTARTED]["epochs"] == "0/1"
    assert status[UNSTARTED]["steps"] == "-"


def aligned_table(lines: list[str]) -> dict[str, dict[str, str]]:
    """Rows of launch/table.py's aligned columns by run: a column starts where its header does."""
    header, *rows = lines
    names = [name for name in header.split("  ") if name]
    starts = [header.index(name) for name in names]
    ends = [*starts[1:], None]
    cells = [{name: row[a:b].strip() for name, a, b in zip(names, starts, ends)} for row in rows if row]
    return {cell["run"]: cell for cell in cells}


def test_status_and_report_of_a_trained_sweep_answer_without_torch(sweep: tuple[Path, list[Run]]):
    """What a login node runs, in a fresh interpreter where torch cannot be imported: the same rows."""
    spec, runs = sweep
    status = login_command(["status", str(spec)])
    assert status.returncode == 0, status.stderr
    rows = aligned_table(status.stdout.splitlines()[1:])
    assert {run.name for run in runs} <= set(rows)
    report = login_command(["report", str(spec), "--format", "csv", "--no-figures"])
    assert report.returncode == 0, report.stderr
    table = {line["run"]: line for line in csv.DictReader(io.StringIO(report.stdout))}
    assert table[TRAINED[0]]["epochs"] == "1/1" and table[UNSTARTED]["epochs"] == "0/1"
