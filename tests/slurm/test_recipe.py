"""Recipe versus resources: each field of the training sections declares, in the schema, whether it
defines a phase's training trajectory (a resume refuses a change) or is a resource (it may change at any
requeue or resubmission). Both sides of the line, field by field; a real pretraining stopped by SIGUSR2
and resumed with its resources changed (loader workers, monitors, logging, timeouts, the data's place,
the evaluation's fields) ends bit-identical to a run never stopped, and one with a changed recipe field
is refused naming it; `--reconfigure` rewrites the configs of runs that are not active and names the ones
it left (on the local SLURM cluster, with held jobs: nothing trains).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch import cli
from sogclr import pretrain
from sogclr.contract.config import PHASES, TRAINING_SECTIONS, RunConfig, recipe_differences, roles
from sogclr.contract.state import read_state
from testkit.e2e import job_ids
from testkit.runs import (
    assert_same_training_state,
    interrupt_at,
    run_module,
    start_module,
    tiny_pretrain,
    wait_ok,
    write_config,
)
from testkit.slurm_cluster import SLURM_GROUP
from testkit.tiny import write_tiny_spec

pytestmark = SLURM_GROUP  # one test needs the cluster: the same worker as the other SLURM tests

# A valid other value for every field of the two training sections, and which phases' recipe it is part
# of: the line as the issue draws it. A field missing here fails the first test.
CHANGES: dict[str, dict[str, tuple[Any, tuple[str, ...]]]] = {
    "pretrain": {
        "dataset": ("imagenet100", PHASES), "image_size": (32, PHASES), "arch": ("resnet34", PHASES),
        "small_stem": (True, PHASES), "width": (16, PHASES), "precision": ("fp16", PHASES),
        "crop_min": (0.2, ("pretrain",)), "augment_on": ("loader", ("pretrain",)),
        "projector_hidden_dim": (32, ("pretrain",)), "projector_out_dim": (16, ("pretrain",)),
        "epochs": (3, ("pretrain",)), "batch_size": (32, ("pretrain",)), "lr": (0.1, ("pretrain",)),
        "lr_scaling": ("linear", ("pretrain",)), "warmup_epochs": (1.0, ("pretrain",)),
        "optimizer": ("sgd", ("pretrain",)), "weight_decay": (1e-4, ("pretrain",)),
        "momentum": (0.8, ("pretrain",)), "trust_coefficient": (0.01, ("pretrain",)),
        "loss": ("simclr", ("pretrain",)), "temperature": (0.2, ("pretrain",)), "gamma": (0.5, ("pretrain",)),
        "gamma_schedule": ("cosine", ("pretrain",)), "gamma_decay_fraction": (0.5, ("pretrain",)),
        "seed": (1, ("pretrain",)),
        "data_dir": ("/moved/data", ()), "accept_data_change": (True, ()), "workers": (3, ()),
        "data_format": ("tree", ()), "stage_dir": ("/local/$SLURMD_NODENAME", ()),
        "compile": (True, ()), "deterministic": (True, ()),
        "log_every_steps": (5, ()), "collective_timeout_s": (900.0, ()),
        "progress_timeout_minutes": (None, ()), "tensorboard": (True, ()),
        "objective_every_epochs": (1, ()), "objective_subset": (100, ()), "knn_every_epochs": (None, ()),
        "knn_subset": (10, ()), "knn_k": (5, ()), "knn_temperature": (0.1, ()),
        "checkpoint": ({"every_minutes": 1.0, "every_steps": 4, "keep": 3}, ()),
    },
    "lincls": {
        "epochs": (2, ("lincls",)), "batch_size": (32, ("lincls",)), "lr": (0.5, ("lincls",)),
        "lr_scaling": ("sqrt", ("lincls",)), "momentum": (0.5, ("lincls",)),
        "weight_decay": (1e-4, ("lincls",)), "mode": ("standard", ("lincls",)), "seed": (3, ("lincls",)),
        "workers": (3, ()), "pretrained": ("/elsewhere/backbone.pt", ()), "log_every_steps": (5, ()),
        "collective_timeout_s": (900.0, ()), "progress_timeout_minutes": (1.0, ()),
        "checkpoint": ({"every_steps": 4}, ()),
    },
}  # fmt: skip
BASE = {
    "run_dir": "/r",
    "pretrain": {"dataset": "folder", "data_dir": "/data", "data_format": "shards"},  # stage_dir needs shards
    "lincls": {"mode": "features"},
}


def test_every_field_of_the_training_sections_declares_its_side_of_the_line() -> None:
    for section, model in TRAINING_SECTIONS.items():
        assert CHANGES[section].keys() == model.model_fields.keys(), section
        for name, field in model.model_fields.items():
            assert set(roles(field)) == set(CHANGES[section][name][1]), f"{section}.{name}"


@pytest.mark.parametrize(
    ("section", "name"), [(section, name) for section, fields in CHANGES.items() for name in fields]
)
def test_a_change_is_refused_exactly_by_the_phases_whose_recipe_holds_it(section: str, name: str) -> None:
    value, refused_by = CHANGES[section][name]
    old = RunConfig.model_validate(BASE).model_dump(mode="json")
    changed = {**BASE, section: {**BASE[section], name: value}}
    new = RunConfig.model_validate(changed).model_dump(mode="json")
    assert old[section][name] != new[section][name]
    for phase in PHASES:
        differences = recipe_differences(old, new, [phase])
        if phase in refused_by:
            assert differences == [f"{section}.{name}: {old[section][name]!r} -> {new[section][name]!r}"]
        else:
            assert differences == [], f"{section}.{name} is a resource of {phase}"


def test_a_config_written_before_a_field_existed_is_not_held_to_it() -> None:
    new = RunConfig.model_validate(BASE).model_dump(mode="json")
    old = {**new, "pretrain": {k: v for k, v in new["pretrain"].items() if k != "gamma"}}
    assert recipe_differences(old, {**new, "pretrain": {**new["pretrain"], "gamma": 0.5}}) == []


def test_a_pretraining_resumes_through_changed_resources_bit_identical(
    tmp_path: Path, data_dir: Path
) -> None:
    recipe = tiny_pretrain(data_dir, knn_every_epochs=1, knn_subset=200)
    straight = tmp_path / "straight"
    uninterrupted = start_module("sogclr.pretrain", write_config(straight, recipe))

    resumed = tmp_path / "resumed"
    interrupt_at(write_config(resumed, recipe, {"epochs": 1}), resumed, step=5)
    moved = tmp_path / "moved-data"
    shutil.copytree(data_dir, moved)
    resources = {
        "workers": 0, "knn_every_epochs": None, "log_every_steps": 3, "collective_timeout_s": 60.0,
        "progress_timeout_minutes": 5.0, "data_dir": str(moved), "checkpoint": {"every_steps": 7},
    }  # fmt: skip
    config = write_config(resumed, recipe | resources, {"epochs": 5, "mode": "standard", "workers": 2})
    run_module("sogclr.pretrain", config)
    assert read_state(resumed / "state.json")["status"] == "done"
    wait_ok(uninterrupted)
    assert_same_training_state(straight / "checkpoints" / "final.pt", resumed / "checkpoints" / "final.pt")

    (resumed / "checkpoints" / "final.pt").unlink()  # as if stopped before the end, with a recipe change
    for path in (resumed / "checkpoints").glob("ckpt-*.pt"):
        path.unlink()
    changed = RunConfig.model_validate(
        yaml.safe_load(config.read_text()) | {"pretrain": recipe | {"lr": 0.1}}
    )
    with pytest.raises(
        ValueError, match=r"recipe differs from this run's config: pretrain\.lr: 0\.05 -> 0\.1$"
    ):
        pretrain.train(changed)


@pytest.mark.slurm
def test_reconfigure_rewrites_the_runs_that_are_not_active_and_names_the_others(
    tmp_path: Path, slurm_cluster: Any, capsys: pytest.CaptureFixture
) -> None:
    held = {"additional": {"hold": True}}  # queued, never started
    sweep = {"product": {"seed": [0, 1]}}
    spec = write_tiny_spec(tmp_path, "reconf", slurm=held, sweep=sweep)
    assert cli.main([str(spec)]) == 0
    cancelled, queued = "seed0", "seed1"
    subprocess.run(["scancel", *job_ids(tmp_path, "reconf", cancelled).values()], check=True)
    try:
        changed = write_tiny_spec(tmp_path, "reconf", slurm=held, sweep=sweep, pretrain={"lr": 0.1})
        capsys.readouterr()
        assert cli.main([str(changed)]) == 2  # a recipe change needs --reconfigure
        assert "pretrain.lr: 0.05 -> 0.1" in capsys.readouterr().err

        assert cli.main([str(changed), "--reconfigure"]) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert f"--reconfigure: rewrote the config of {cancelled}" in out
        assert f"--reconfigure: left the config of {queued}: a job of theirs is queued or running" in out
        runs = tmp_path / "runs" / "reconf"
        assert yaml.safe_load((runs / cancelled / "config.yaml").read_text())["pretrain"]["lr"] == 0.1
        assert yaml.safe_load((runs / queued / "config.yaml").read_text())["pretrain"]["lr"] == 0.05
    finally:
        subprocess.run(["scancel", *job_ids(tmp_path, "reconf", queued).values()], check=True)
