"""The sweep spec: expansion, run names, and one clear line (exit status 2) for every kind of bad input."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.spec import SweepSpec, expand, load_spec, parse_time_limit
from sogclr.contract.config import load_run_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def quickstart() -> dict:
    return yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())


def write_spec(tmp_path: Path, data: dict) -> Path:
    data = copy.deepcopy(data)
    data["output_root"] = str(tmp_path / "runs")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_shipped_specs_expand_to_the_documented_runs() -> None:
    gamma = expand(load_spec(CONFIGS / "gamma_sweep.yaml"))
    assert [run.name for run in gamma] == [f"gamma{g}" for g in ("0.1", "0.3", "0.5", "0.7", "0.9", "0.99")]
    assert all(run.config.pretrain.epochs == 400 and run.config.pretrain.batch_size == 256 for run in gamma)
    assert all(run.slurm.nodes == 1 and run.slurm.gpus_per_node == 4 for run in gamma)

    study = expand(load_spec(CONFIGS / "batch_size_sweep.yaml"))
    points = {(run.config.pretrain.loss, run.config.pretrain.batch_size) for run in study}
    assert points == {
        (loss, b) for loss in ("sogclr", "simclr") for b in (128, 256, 512, 1024, 2048, 4096, 8192)
    }
    biggest = next(run for run in study if run.config.pretrain.batch_size == 8192)
    assert biggest.slurm.nodes == 8 and biggest.lincls_slurm.nodes == 1
    for name in ("imagenet1k", "imagenet100", "quickstart"):
        assert expand(load_spec(CONFIGS / f"{name}.yaml"))

    digits = expand(load_spec(CONFIGS / "digits_batch_study.yaml"))  # docs/studies.md's study on the digits
    points = {(run.config.pretrain.loss, run.config.pretrain.batch_size) for run in digits}
    assert points == {(loss, b) for loss in ("sogclr", "simclr") for b in (16, 64, 256)}
    assert all(run.config.pretrain.dataset == "digits" and run.slurm.gpus_per_node == 0 for run in digits)


def test_reference_recipe_is_the_default() -> None:
    pretrain = SweepSpec(name="x").pretrain
    assert (pretrain.arch, pretrain.epochs, pretrain.batch_size, pretrain.optimizer) == (
        "resnet50",
        800,
        256,
        "lars",
    )
    assert (pretrain.lr, pretrain.lr_scaling, pretrain.temperature, pretrain.gamma) == (
        0.075,
        "sqrt",
        0.1,
        0.9,
    )
    assert (pretrain.weight_decay, pretrain.momentum, pretrain.warmup_epochs) == (1e-6, 0.9, 10.0)
    assert (pretrain.projector_hidden_dim, pretrain.projector_out_dim, pretrain.crop_min) == (2048, 128, 0.08)


def test_run_directories_and_resolved_configs(tmp_path: Path) -> None:
    data = quickstart()
    data["sweep"] = {"product": {"gamma": [0.5, 0.9], "pretrain.epochs": [2, 4]}}
    runs = expand(load_spec(write_spec(tmp_path, data)))
    assert [run.name for run in runs] == ["gamma0.5-ep2", "gamma0.5-ep4", "gamma0.9-ep2", "gamma0.9-ep4"]
    assert runs[1].run_dir == tmp_path / "runs" / "quickstart" / "gamma0.5-ep4"
    assert runs[1].config.pretrain.gamma == 0.5 and runs[1].config.pretrain.epochs == 4
    assert runs[1].point == {"pretrain.gamma": 0.5, "pretrain.epochs": 4}


def test_zip_moves_fields_together_inside_the_product(tmp_path: Path) -> None:
    data = quickstart()
    data["sweep"] = {
        "product": {"loss": ["sogclr", "simclr"]},
        "zip": {"batch_size": [64, 128], "slurm.nodes": [1, 2], "lincls.epochs": [3, 5]},
    }
    runs = expand(load_spec(write_spec(tmp_path, data)))
    assert [run.name for run in runs] == [
        "sogclr-bs64-n1-lin-epochs3",
        "sogclr-bs128-n2-lin-epochs5",
        "simclr-bs64-n1-lin-epochs3",
        "simclr-bs128-n2-lin-epochs5",
    ]
    assert runs[1].slurm.nodes == 2 and runs[1].config.lincls.epochs == 5


def test_runs_list_points_as_one_factor_of_the_product(tmp_path: Path) -> None:
    data = quickstart()
    data["sweep"] = {
        "product": {"seed": [0, 1]},
        "runs": [
            {"loss": "simclr"},
            {"loss": "sogclr", "gamma": 0.1, "gamma_schedule": "cosine"},
            {"loss": "sogclr", "pretrain.gamma": 0.9, "slurm.nodes": 2},
        ],
    }
    runs = expand(load_spec(write_spec(tmp_path, data)))
    assert [run.name for run in runs] == [
        "seed0-simclr",
        "seed0-sogclr-gamma0.1-cosine",
        "seed0-sogclr-gamma0.9-n2",
        "seed1-simclr",
        "seed1-sogclr-gamma0.1-cosine",
        "seed1-sogclr-gamma0.9-n2",
    ]
    simclr, cosine, default_schedule = (run.config.pretrain for run in runs[3:])
    assert (simclr.loss, simclr.seed, simclr.gamma) == (
        "simclr",
        1,
        quickstart()["pretrain"].get("gamma", 0.9),
    )
    assert (cosine.gamma, cosine.gamma_schedule) == (0.1, "cosine")
    assert default_schedule.gamma_schedule == "constant" and runs[5].slurm.nodes == 2
    assert runs[1].point == {
        "pretrain.seed": 0,
        "pretrain.loss": "sogclr",
        "pretrain.gamma": 0.1,
        "pretrain.gamma_schedule": "cosine",
    }


def test_set_overrides_any_field(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, quickstart()), ["pretrain.temperature=0.3", "slurm.nodes=2"])
    assert spec.pretrain.temperature == 0.3 and spec.slurm.nodes == 2


def test_lincls_inherits_then_overrides_resources(tmp_path: Path) -> None:
    data = quickstart()
    data["lincls"]["slurm"] = {"time": "00:20:00"}
    run = expand(load_spec(write_spec(tmp_path, data)))[0]
    assert run.lincls_slurm.time == "00:20:00" and run.lincls_slurm.cpus_per_task == run.slurm.cpus_per_task


def test_time_limits() -> None:
    assert parse_time_limit("01:02:03") == 3723
    assert parse_time_limit("2-00:00:10") == 2 * 86400 + 10
    with pytest.raises(ValueError):
        parse_time_limit("90")


def test_dcl_is_an_alias_of_sogclr(tmp_path: Path) -> None:
    data = quickstart()
    data["pretrain"]["loss"] = "dcl"
    assert load_spec(write_spec(tmp_path, data)).pretrain.loss == "sogclr"


def test_json_schema_describes_the_spec(capsys: pytest.CaptureFixture) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"name", "slurm", "pretrain", "lincls", "sweep"} <= set(schema["properties"])
    assert schema["$defs"]["PretrainConfig"]["properties"]["gamma"]["exclusiveMinimum"] == 0


def test_dry_run_lists_runs_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = write_spec(tmp_path, quickstart())
    assert main([str(spec), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "gamma0.5" in out and "gamma0.9" in out and "2 run(s)" in out
    assert not (tmp_path / "runs").exists()


def test_dry_run_only_warns_about_missing_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(CONFIGS / "gamma_sweep.yaml"), "--dry-run", "--set", f"output_root={tmp_path}"]) == 0
    captured = capsys.readouterr()
    assert "warning: pretrain.data_dir: /datasets/imagenet does not exist" in " ".join(captured.out.split())


def _edit(path: str, value) -> callable:
    def apply(data: dict) -> None:
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    return apply


BAD_SPECS = {
    "unknown key": (_edit("pretrain.gama", 0.5), "pretrain.gama: unknown key (did you mean 'gamma'?)"),
    "unknown section": (_edit("slurmm", {}), "slurmm: unknown key (did you mean 'slurm'?)"),
    "wrong type": (_edit("pretrain.epochs", "many"), "pretrain.epochs: Input should be a valid integer"),
    "gamma above 1": (
        _edit("pretrain.gamma", 1.5),
        "pretrain.gamma: Input should be less than or equal to 1",
    ),
    "gamma zero": (_edit("pretrain.gamma", 0), "pretrain.gamma: Input should be greater than 0"),
    "temperature": (_edit("pretrain.temperature", 0), "pretrain.temperature: Input should be greater than 0"),
    "negative epochs": (_edit("pretrain.epochs", -1), "pretrain.epochs: Input should be greater than 0"),
    "bad choice": (_edit("pretrain.loss", "moco"), "pretrain.loss: Input should be 'sogclr' or 'simclr'"),
    "empty sweep": (_edit("sweep.product.gamma", []), "sweep.product.gamma: empty list"),
    "sweep unknown key": (
        _edit("sweep.product.gammma", [0.5]),
        "sweep.product.gammma: no such field (did you mean 'pretrain.gamma'?)",
    ),
    "sweep bad value": (
        _edit("sweep.product.gamma", [0.5, 2.0]),
        "pretrain.gamma: Input should be less than",
    ),
    "duplicate runs": (_edit("sweep.product.gamma", [0.5, 0.50]), "sweep: duplicate run name 'gamma0.5'"),
    "zip lengths": (
        _edit("sweep.zip", {"gamma": [0.5], "epochs": [1, 2]}),
        "sweep.zip: lists must have equal",
    ),
    "runs empty": (_edit("sweep", {"runs": []}), "sweep.runs: empty list"),
    "runs empty entry": (_edit("sweep", {"runs": [{"gamma": 0.5}, {}]}), "sweep.runs[1]: empty entry"),
    "runs entry not a mapping": (
        _edit("sweep", {"runs": [{"gamma": 0.5}, "simclr"]}),
        "sweep.runs[1]: Input should be a valid dictionary",
    ),
    "runs unknown key": (
        _edit("sweep", {"runs": [{"loss": "simclr"}, {"gamme": 0.5}]}),
        "sweep.runs[1].gamme: no such field (did you mean 'pretrain.gamma'?)",
    ),
    "runs bad type": (
        _edit("sweep", {"runs": [{"loss": "simclr"}, {"loss": "sogclr", "gamma": "high"}]}),
        "sweep.runs[1].gamma: Input should be a valid number",
    ),
    "runs bad value": (
        _edit("sweep", {"runs": [{"slurm.nodes": 0}]}),
        "sweep.runs[0].slurm.nodes: Input should be greater than or equal to 1",
    ),
    "runs and product sweep one field": (
        _edit("sweep", {"product": {"gamma": [0.5]}, "runs": [{"pretrain.gamma": 0.9}]}),
        "sweep.runs[0].pretrain.gamma: pretrain.gamma is swept twice (also in sweep.product)",
    ),
    "product and zip sweep one field": (
        _edit("sweep", {"product": {"epochs": [1]}, "zip": {"epochs": [2]}}),
        "sweep.zip.epochs: pretrain.epochs is swept twice (also in sweep.product)",
    ),
    "one field twice in product": (
        _edit("sweep", {"product": {"gamma": [0.5], "pretrain.gamma": [0.9]}}),
        "sweep.product.pretrain.gamma: pretrain.gamma is swept twice (also in sweep.product)",
    ),
    "one field twice in a run": (
        _edit("sweep", {"runs": [{"gamma": 0.5}, {"gamma": 0.5, "pretrain.gamma": 0.9}]}),
        "sweep.runs[1].pretrain.gamma: pretrain.gamma is swept twice (also in sweep.runs[1])",
    ),
    "runs duplicate names": (
        _edit("sweep", {"runs": [{"gamma": 0.5}, {"gamma": 0.50}]}),
        "sweep: duplicate run name 'gamma0.5'",
    ),
    "indivisible batch": (
        _edit("slurm.nodes", 3),
        "pretrain.batch_size: 128 is not divisible by the number of",
    ),
    "time below lead": (
        _edit("slurm.time", "00:00:30"),
        "slurm: time 00:00:30 must be longer than signal_lead_s",
    ),
    "time format": (_edit("slurm.time", "30m"), "slurm.time: expected HH:MM:SS or D-HH:MM:SS"),
    "lincls resources": (_edit("lincls.slurm", {"nodez": 2}), "lincls.slurm.nodez: unknown key"),
    "additional sets nodes": (
        _edit("slurm.additional", {"nodes": 4}),
        "slurm.additional.nodes: the launcher sets this option",
    ),
    "additional, dashes": (
        _edit("slurm.additional", {"ntasks-per-node": 2}),
        "slurm.additional.ntasks-per-node: the launcher sets this option",
    ),
    "additional sets signal for lincls": (
        _edit("lincls.slurm", {"additional": {"signal": "USR1@60"}}),
        "lincls.slurm.additional.signal: the launcher sets this option",
    ),
    "additional injects a line": (
        _edit("slurm.additional", {"reservation": "x\n#SBATCH --nodes=64"}),
        "slurm.additional.reservation: a newline or control character",
    ),
    "additional sets the comment": (
        _edit("slurm.additional", {"comment": "mine"}),
        "slurm.additional.comment: the launcher sets this option",
    ),
    # YAML's `account: |` adds a newline: it would end the #SBATCH block and drop every line after it
    **{
        f"newline in {field}": (
            _edit(f"slurm.{field}", "x\n"),
            f"slurm.{field}: a newline or control character",
        )
        for field in ("partition", "account", "qos", "constraint")
    },
    "newline in lincls account": (
        _edit("lincls.slurm", {"account": "x\n"}),
        "lincls.slurm.account: a newline or control character",
    ),
    "newline after time": (_edit("slurm.time", "24:00:00\n"), "slurm.time: expected HH:MM:SS or D-HH:MM:SS"),
    "no warning before the time limit": (
        _edit("slurm.signal_lead_s", 0),
        "slurm.signal_lead_s: Input should be greater than or equal to 1",
    ),
    "a watchdog that kills healthy runs": (
        _edit("lincls.progress_timeout_minutes", 0.25),
        "lincls.progress_timeout_minutes: Input should be greater than or equal to 1 (got 0.25)",
    ),
    "additional key is no option": (
        _edit("slurm.additional", {"x --nodes": 2}),
        "slurm.additional.x --nodes: not an sbatch option name",
    ),
    "missing data dir": (
        _edit("pretrain", {**quickstart()["pretrain"], "dataset": "folder", "data_dir": "/no/such/dir"}),
        "pretrain.data_dir: /no/such/dir does not exist",
    ),
}


@pytest.mark.parametrize("case", BAD_SPECS, ids=list(BAD_SPECS))
def test_bad_spec_is_one_line_exit_2_nothing_written(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    edit, expected = BAD_SPECS[case]
    data = quickstart()
    edit(data)
    assert main([str(write_spec(tmp_path, data))]) == 2
    captured = capsys.readouterr()
    error = " ".join(captured.err.split())  # rich may wrap long lines on narrow terminals
    assert error.startswith("error: ") and expected in error, error
    assert not (tmp_path / "runs").exists()


def test_malformed_yaml_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\npretrain:\n  gamma: 0.5\n  epochs: [1\nslurm: {}\n")
    assert main([str(path)]) == 2
    assert f"{path}:5: malformed YAML" in " ".join(capsys.readouterr().err.split())


def test_missing_spec_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(tmp_path / "nope.yaml"), "--dry-run"]) == 2
    assert "nope.yaml: no such spec file" in capsys.readouterr().err


def test_bad_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([str(write_spec(tmp_path, quickstart())), "--set", "pretrain.gamma"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_console_script_exits_2_with_one_line(tmp_path: Path) -> None:
    data = quickstart()
    data["pretrain"]["gama"] = 0.5
    result = subprocess.run(
        [sys.executable, "-m", "launch.cli", str(write_spec(tmp_path, data))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: pretrain.gama: unknown key (did you mean 'gamma'?)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_shipped_run_config_is_valid() -> None:
    config = load_run_config(CONFIGS / "run" / "digits.yaml")
    assert config.pretrain.dataset == "digits" and config.lincls is not None


def test_additional_takes_other_sbatch_options(tmp_path: Path) -> None:
    data = {**quickstart(), "slurm": {"additional": {"hold": True, "x": "a b"}}}
    spec = load_spec(write_spec(tmp_path, data))
    assert spec.slurm.additional == {"hold": True, "x": "a b"}
