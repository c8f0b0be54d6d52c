"""`sogclr-submit report --seeds`: mean ± sd over a swept seed, on a real tiny sweep run here (--local).

Two explicit runs (SimCLR, SogCLR) x two seeds; three of the four are trained (two epochs, the exact
global objective logged after each), one is left unstarted, as in a study still in flight.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from PIL import Image

from launch import cli
from launch.inspect.figures import seeds_figure
from launch.inspect.results import RunRow, collect, seed_groups, table_epochs
from launch.manifest import read_manifest
from launch.spec import Run, expand, load_spec
from launch.standing import standings
from testkit.tiny import write_tiny_spec

TRAINED = ("seed0-simclr", "seed0-gamma0.5-sogclr", "seed1-simclr")
UNSTARTED = "seed1-gamma0.5-sogclr"

pytestmark = pytest.mark.xdist_group("report_seeds")  # one worker trains the sweep once for every test


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Run]]:
    directory = tmp_path_factory.mktemp("seeds")
    spec = write_tiny_spec(
        directory,
        "seeds",
        pretrain={"epochs": 2, "objective_every_epochs": 1, "objective_subset": 64},
        sweep={
            "product": {"seed": [0, 1]},
            "runs": [{"loss": "simclr"}, {"loss": "sogclr", "gamma": 0.5}],
        },
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        for name in TRAINED:
            assert cli.main([str(spec), "--local", "--run", name]) == 0
    return spec, expand(load_spec(spec))


def rows_of(spec: Path, runs: list[Run]) -> list[RunRow]:
    return collect(runs, standings(runs, read_manifest(load_spec(spec).directory)))


def logged(run: Run, key: str) -> list[float]:
    records = [json.loads(line) for line in run.files.pretrain.metrics.read_text().splitlines()]
    return [record[key] for record in records if key in record]


def test_groups_average_the_seeds_that_have_a_value(sweep: tuple[Path, list[Run]]) -> None:
    spec, runs = sweep
    by_name = {run.name: run for run in runs}
    simclr, sogclr = seed_groups(rows_of(spec, runs))
    assert simclr.point == {"pretrain.loss": "simclr"}
    assert sogclr.point == {"pretrain.gamma": 0.5, "pretrain.loss": "sogclr"}  # as YAML sorted them
    assert [row.run for row in simclr.rows] == ["seed0-simclr", "seed1-simclr"]
    assert table_epochs([simclr, sogclr]) == [1, 2]

    both = [logged(by_name[name], "global_objective")[-1] for name in ("seed0-simclr", "seed1-simclr")]
    final = simclr.at_epoch("global_objective", 2)
    assert final.n == 2 and final.mean == pytest.approx(statistics.mean(both))
    assert final.sd == pytest.approx(statistics.stdev(both))
    linear = simclr.final("linear_top1")
    assert linear.n == 2 and linear.mean == pytest.approx(
        statistics.mean(row.linear_top1 for row in simclr.rows)
    )

    only = sogclr.at_epoch("global_objective", 1)  # one of its seeds has not started: n = 1, no sd
    assert (only.n, only.sd) == (1, None)
    assert only.mean == logged(by_name["seed0-gamma0.5-sogclr"], "global_objective")[0]
    epochs, spreads = sogclr.band("global_objective_pooled_views")
    assert epochs == [1, 2] and [s.mean for s in spreads] == logged(
        by_name["seed0-gamma0.5-sogclr"], "global_objective_pooled_views"
    )


def test_seeds_table_and_figure(sweep: tuple[Path, list[Run]], capsys: pytest.CaptureFixture) -> None:
    spec, runs = sweep
    assert cli.main(["report", str(spec), "--seeds", "--format", "md"]) == 0
    header, _, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith(
        "| loss | gamma | seeds done | global objective @1 | global objective @2 | pooled @2 |"
    )
    assert len(lines) == 2 and lines[1].startswith("| sogclr | 0.5 | 1/2 |") and "(n=1)" in lines[1]
    assert " ± " in lines[0] and "(n=" not in lines[0]

    assert cli.main(["report", str(spec), "--seeds", "--format", "json", "--no-figures"]) == 0
    simclr, sogclr = json.loads(capsys.readouterr().out)
    assert simclr["global_objective"]["2"]["n"] == 2 and sogclr["linear_top1"]["n"] == 1
    assert sogclr["runs"] == ["seed0-gamma0.5-sogclr", UNSTARTED]

    report = load_spec(spec).directory / "report" / "seeds-global_objective.png"
    assert report.is_file()  # written by the first report

    assert cli.main(["report", str(spec), "--format", "csv", "--no-figures"]) == 0  # one row per run
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith("run,seed,loss,gamma,standing") and len(lines) == 4
    path = seeds_figure(seed_groups(rows_of(spec, runs)), "global_objective", spec.parent / "seeds.png")
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.width > 100


def test_seeds_needs_a_swept_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_tiny_spec(tmp_path, "noseed", sweep={"runs": [{"loss": "simclr"}, {"loss": "sogclr"}]})
    assert cli.main(["report", str(spec), "--seeds"]) == 2
    assert "--seeds: the sweep does not vary pretrain.seed" in capsys.readouterr().err
