"""Successive halving inside the runs (sogclr/training/prune.py): the rule, the spec's validation, the records
under concurrency (real processes reaching a rung at once), and real pretraining runs pruned at a rung,
requeued across it, and resumed after it. Tiny runs: digits at 16 px, batch 128 (11 steps per epoch),
kNN after every epoch on a 300-image bank, one rung after epoch 1 of 2.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.spec import SpecError, expand, load_spec
from sogclr.contract.config import PretrainConfig, PruneConfig, yardstick
from sogclr.contract.rungs import CLOSED, PROMOTED, Contender, RungRecords, decide, keep_count, promotions
from sogclr.contract.state import read_state
from sogclr.training.checkpoint import load_file
from testkit.runs import assert_same_training_state, record_rival, run_module, tiny_pretrain

STEPS = 11  # 1437 training digits // 128


# --- the rule ---------------------------------------------------------------------------------------


def test_the_top_one_over_eta_continue_and_the_first_arrivals_face_fewer_rivals() -> None:
    assert [keep_count(n, 3) for n in (1, 2, 3, 5, 6, 9, 10)] == [1, 1, 1, 1, 2, 3, 3]
    assert decide("a", {"a": 50.0}, maximize=True, eta=3)["continue"]  # the first arrival always
    second = decide("b", {"a": 50.0, "b": 40.0}, maximize=True, eta=3)
    assert not second["continue"] and second["threshold"] == 50.0 and second["keep"] == 1
    assert decide("b", {"a": 50.0, "b": 60.0}, maximize=True, eta=3)["continue"]
    assert decide("b", {"a": 50.0, "b": 50.0}, maximize=True, eta=3)["continue"]  # a tie continues
    values = {"a": 10.0, "b": 20.0, "c": 30.0, "d": 40.0, "e": 50.0, "f": 60.0}
    kept = [run for run in values if decide(run, values, maximize=True, eta=3)["continue"]]
    assert kept == ["e", "f"]  # 6 recorded, eta 3: the top 2
    kept = [run for run in values if decide(run, values, maximize=False, eta=2)["continue"]]
    assert kept == ["a", "b", "c"]  # global_objective: lower is better
    table = decide("c", values, maximize=True, eta=3)["table"]
    assert [row["run"] for row in table] == ["f", "e", "d", "c", "b", "a"]  # best first


def test_a_diverged_run_never_continues_and_ranks_last() -> None:
    values = {"a": math.nan, "b": 10.0}
    assert not decide("a", {"a": math.nan}, maximize=True, eta=2)["continue"]
    assert decide("b", values, maximize=True, eta=2)["continue"]
    assert decide("b", values, maximize=False, eta=2)["table"][-1]["run"] == "a"


def test_a_paused_run_is_promoted_once_later_arrivals_put_it_in_the_rung_top() -> None:
    arrivals = {"a": 50.0, "b": 60.0, "c": 55.0}  # c arrives third: only the best of 3 (60) continues
    assert not decide("c", arrivals, maximize=True, eta=3)["continue"]
    assert promotions(arrivals, {"c"}, maximize=True, eta=3) == []
    later = {**arrivals, "d": 10.0, "e": 20.0, "f": 30.0}  # 6 recorded: the top 2 are b and c
    assert promotions(later, {"c", "d", "e", "f"}, maximize=True, eta=3) == ["c"]
    assert promotions({**later, "g": math.nan}, {"c", "g"}, maximize=True, eta=3) == ["c"]  # NaN never


def test_the_records_give_a_promotion_exactly_once_and_close_the_rest(tmp_path: Path) -> None:
    cfg = PruneConfig(metric="knn_top1", eta=3, rungs=[2], records=tmp_path)
    rung = RungRecords(tmp_path, 2)
    for run, value in {"a": 50.0, "b": 60.0, "c": 55.0, "d": 10.0, "e": 20.0, "f": 30.0}.items():
        rung.decide(contender(run), cfg, value, step=22)
    paused = set(rung.paused(cfg, SETTINGS))
    assert paused == {"c", "d", "e", "f"}  # a and b were each the best so far when they arrived
    promotable = rung.promotable(cfg, SETTINGS)
    assert list(promotable) == ["c"] and promotable["c"]["verdict"] == PROMOTED
    assert promotable["c"]["keep"] == 2 and promotable["c"]["threshold"] == 55.0
    assert rung.give(promotable["c"], by="f") and not rung.give(promotable["c"], by="e")  # once
    assert rung.verdict("c", "c-t1")["by"] == "f"
    standing = rung.standing(contender("c"), cfg)
    assert standing["continue"] and standing["promoted"]["verdict"] == PROMOTED
    assert rung.decide(contender("c"), cfg, 0.0, step=22) == standing  # a resume after it continues
    assert rung.promotable(cfg, SETTINGS) == {}
    closable = rung.closable(cfg, SETTINGS)
    assert set(closable) == paused - {"c"} and {v["verdict"] for v in closable.values()} == {CLOSED}


def test_the_arrival_order_matters_to_the_stopping_rule_and_promotion_repairs_it() -> None:
    # a perfectly predictive metric, the worst first: each arrival is the best so far and continues;
    # the best first: every later one stops, and the top 1/eta is only found by promotion
    values = {f"r{i}": float(i) for i in range(9)}
    best_first = sorted(values, key=values.get, reverse=True)
    seen: dict[str, float] = {}
    kept = []
    for run in best_first:
        seen[run] = values[run]
        kept += [run] if decide(run, seen, maximize=True, eta=3)["continue"] else []
    assert kept == ["r8"]
    assert promotions(values, set(values) - {"r8"}, maximize=True, eta=3) == ["r6", "r7"]


def test_a_decision_counts_only_for_its_training_metric_eta_and_settings(tmp_path: Path) -> None:
    cfg = PruneConfig(metric="knn_top1", eta=2, rungs=[4], records=tmp_path)
    rung = RungRecords(tmp_path, 4)
    assert rung.decide(contender("lr0.1"), cfg, 62.0, step=400)["continue"]
    assert not rung.decide(contender("lr0.2"), cfg, 40.0, step=400)["continue"]
    # lr0.1 trained again from scratch: it forgets its records first, then is judged on its new value
    rung.forget("lr0.1")
    assert rung.values("knn_top1", SETTINGS) == {"lr0.2": 40.0}  # its old value is nobody's rival
    again = rung.decide(contender("lr0.1", "t2"), cfg, 5.0, step=400)
    assert again["value"] == 5.0 and not again["continue"] and again["training"] == "lr0.1-t2"
    assert read_state(rung.record_path("lr0.1"))["value"] == 5.0
    # another eta, or another metric: the old decision is not this one's
    assert rung.standing(contender("lr0.2"), cfg.model_copy(update={"eta": 3})) is None
    assert rung.standing(contender("lr0.2"), cfg.model_copy(update={"metric": "global_objective"})) is None
    # a value measured with another kNN k is left out of the table
    other = {**SETTINGS, "knn_k": 200}
    decision = rung.decide(Contender("k200", "k200-t1", other), cfg, 1.0, step=400)
    assert [row["run"] for row in decision["table"]] == ["k200"] and decision["continue"]
    assert set(rung.values("knn_top1", SETTINGS)) == {"lr0.1", "lr0.2"}


# --- the spec ---------------------------------------------------------------------------------------


def write_spec(tmp_path: Path, prune: dict, **pretrain: object) -> Path:
    spec = {
        "name": "halving",
        "output_root": str(tmp_path / "runs"),
        "slurm": {"gpus_per_node": 0, "cpus_per_task": 1},
        "pretrain": {"dataset": "digits", "epochs": 16, "knn_every_epochs": 2, **pretrain},
        "sweep": {"product": {"gamma": [0.5, 0.9]}, "prune": prune},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_rungs_come_from_the_first_rung_and_eta_or_a_list_and_reach_the_run_config(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_spec(tmp_path, {"first_rung": 2, "eta": 2})
    (run, _) = expand(load_spec(spec))
    records = tmp_path / "runs" / "halving" / "prune"
    assert run.config.prune == PruneConfig(metric="knn_top1", eta=2, rungs=[2, 4, 8], records=records)
    assert main([str(spec), "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (
        "pruning: knn_top1 after epochs 2, 4, 8; at a rung a run continues if it is among the best "
        "max(1, n // 2) of the n runs recorded there so far (the first arrival always does); a run stopped "
        "there is paused, and continued from its checkpoint as soon as later arrivals put it among the "
        f"rung's best max(1, n // 2) (promotion) records in {records}"
    ) in out
    spec = write_spec(tmp_path, {"first_rung": 2, "eta": 2, "promote": False})
    assert main([str(spec), "--dry-run"]) == 0
    assert "a run stopped there is stopped for good" in " ".join(capsys.readouterr().out.split())
    spec = write_spec(tmp_path, {"rungs": [6], "metric": "global_objective"}, objective_every_epochs=3)
    assert expand(load_spec(spec))[0].config.prune.rungs == [6]


@pytest.mark.parametrize(
    ("prune", "product", "error"),
    [
        ({"first_rung": 2, "metric": "global_objective"}, {"temperature": [0.1, 0.5]},
         "sweep.prune.metric: global_objective is not comparable across pretrain.temperature, which the "
         "sweep varies (0.1, 0.5); prune on knn_top1"),
        ({"first_rung": 2, "metric": "global_objective"}, {"loss": ["sogclr", "simclr"]},
         "global_objective is not comparable across pretrain.loss"),
        ({"first_rung": 2, "metric": "global_objective"}, {"projector_out_dim": [64, 128]},
         "global_objective is not comparable across pretrain.projector_out_dim"),
        ({"first_rung": 2}, {"epochs": [16, 32]}, "sweep.prune: the runs have different pretrain.epochs "
         "(16, 32): at a rung's epoch they are at different points of their schedules"),
        ({"first_rung": 2}, {"warmup_epochs": [1, 4]}, "different pretrain.warmup_epochs (1.0, 4.0)"),
        ({"first_rung": 2}, {"knn_k": [10, 20]}, "sweep.prune.metric: knn_top1 is not comparable across "
         "pretrain.knn_k, which the sweep varies (10, 20)"),
        ({"first_rung": 2}, {"knn_subset": [300, 1000]}, "not comparable across pretrain.knn_subset"),
    ],
)  # fmt: skip
def test_a_pruned_sweep_that_compares_unlike_runs_is_refused_in_one_line(
    tmp_path: Path, prune: dict, product: dict, error: str
) -> None:
    spec = write_spec(tmp_path, {**prune}, objective_every_epochs=2)
    data = yaml.safe_load(spec.read_text())
    data["sweep"]["product"] = product
    spec.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as raised:
        expand(load_spec(spec))
    assert error in str(raised.value) and "\n" not in str(raised.value)
    assert main([str(spec), "--dry-run"]) == 2  # before anything is submitted


def test_records_measured_with_other_settings_refuse_the_submission(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    spec = write_spec(tmp_path, {"first_rung": 2})
    (run, _) = expand(load_spec(spec))
    before = yardstick(run.config.pretrain, "knn_top1")
    RungRecords(run.config.prune.records, 2).record(Contender("gamma0.5", "t", before), "knn_top1", 50.0, 0)
    assert main([str(spec), "--dry-run"]) == 0
    assert main([str(spec), "--dry-run", "--set", "pretrain.knn_k=50"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "rung-2/gamma0.5.json was measured with pretrain.knn_k=20 (now 50)" in err


@pytest.mark.parametrize(
    ("prune", "pretrain", "error"),
    [
        ({"first_rung": 16}, {}, "gamma0.5: sweep.prune.first_rung: rung 16 is not below pretrain.epochs"),
        ({"rungs": [4, 20]}, {}, "run gamma0.5: sweep.prune.rungs: rung 20 is not below pretrain.epochs"),
        ({"first_rung": 3}, {}, "sweep.prune.first_rung: knn_top1 is logged every 2 epochs "
         "(pretrain.knn_every_epochs), not after epoch 3"),
        ({"first_rung": 2, "metric": "global_objective"}, {}, "global_objective is never logged "
         "(pretrain.objective_every_epochs is null), but a rung is at epoch 2"),
        ({"first_rung": 2}, {"knn_every_epochs": None}, "knn_top1 is never logged"),
        ({"first_rung": 2, "eta": 1}, {}, "sweep.prune.eta: Input should be greater than or equal to 2"),
        ({"first_rung": 2, "eta": 1.5}, {}, "sweep.prune.eta: Input should be a valid integer"),
        ({"first_rung": 2, "rungs": [2]}, {}, "sweep.prune: give either first_rung (with eta) or rungs"),
        ({"rungs": [4, 2]}, {}, "sweep.prune.rungs: epochs must be one or more, positive and increasing"),
        ({"first_rung": 2, "metric": "loss"}, {}, "sweep.prune.metric: Input should be 'knn_top1' or"),
    ],
)  # fmt: skip
def test_a_bad_prune_section_is_one_line_naming_the_field(
    tmp_path: Path, prune: dict, pretrain: dict, error: str
) -> None:
    with pytest.raises(SpecError) as raised:
        expand(load_spec(write_spec(tmp_path, prune, **pretrain)))
    assert error in str(raised.value) and "\n" not in str(raised.value)


# --- the records under concurrency ------------------------------------------------------------------

CONCURRENT_RUNS = 8


SETTINGS = yardstick(PretrainConfig(), "knn_top1")


def contender(run: str, training: str = "t1", settings: dict = SETTINGS) -> Contender:
    return Contender(run, f"{run}-{training}", settings)


def _reach_rung(records: Path, run: str, value: float, barrier: multiprocessing.synchronize.Barrier) -> None:
    cfg = PruneConfig(metric="knn_top1", eta=3, rungs=[2], records=records)
    barrier.wait()  # every process records and reads at the same moment
    RungRecords(records, 2).decide(contender(run), cfg, value, step=22)


def test_runs_reaching_a_rung_at_once_each_record_and_decide_on_what_they_saw(tmp_path: Path) -> None:
    values = {f"run{i}": float(10 * ((i * 3) % CONCURRENT_RUNS)) for i in range(CONCURRENT_RUNS)}
    context = multiprocessing.get_context("fork")  # real processes (forked: no second torch import)
    barrier = context.Barrier(CONCURRENT_RUNS)
    processes = [
        context.Process(target=_reach_rung, args=(tmp_path, run, v, barrier)) for run, v in values.items()
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0

    rung = RungRecords(tmp_path, 2)
    assert rung.values("knn_top1", SETTINGS) == values  # every record whole
    assert not list(tmp_path.rglob(".*.tmp"))  # no writer left a temporary file
    decisions = {run: rung.decision(run) for run in values}
    tables = []
    for run, decision in decisions.items():
        seen = {row["run"]: row["value"] for row in decision["table"]}
        assert seen[run] == values[run] and seen.items() <= values.items()  # its own, and real records
        # the recorded decision is the rule applied to the recorded table
        assert decide(run, seen, maximize=True, eta=3) | {"table": decision["table"]} == {
            k: decision[k] for k in ("value", "keep", "threshold", "continue", "table")
        }
        tables.append(len(seen))
    assert max(tables) == CONCURRENT_RUNS  # the last to write saw everyone: records before reading
    best = max(values, key=values.get)
    assert decisions[best]["continue"]

    # A requeued attempt at the same rung keeps its decision, whatever has been recorded since.
    before = rung.decision_path("run1").read_bytes()
    cfg = PruneConfig(metric="knn_top1", eta=3, rungs=[2], records=tmp_path)
    assert rung.decide(contender("run1"), cfg, value=-1.0, step=22) == decisions["run1"]
    assert rung.decision_path("run1").read_bytes() == before


# --- real pretraining runs --------------------------------------------------------------------------


def prune_config(run_dir: Path, data_dir: Path, records: Path, **pretrain: object) -> Path:
    """A run config: 2 epochs, kNN after each, one rung after epoch 1 (eta 2), records in `records`."""
    recipe = tiny_pretrain(
        data_dir, batch_size=128, knn_every_epochs=1, knn_subset=300, workers=0, **pretrain
    )
    config = {
        "run_dir": str(run_dir),
        "pretrain": recipe,
        "prune": {"metric": "knn_top1", "eta": 2, "rungs": [1], "records": str(records)},
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def rival_recipe(config: Path) -> PretrainConfig:
    """The recipe of the run `config` describes: the rival's metric is measured as ours."""
    return PretrainConfig.model_validate(yaml.safe_load(config.read_text())["pretrain"])


def test_a_pruned_run_of_two_ranks_saves_at_the_rung_records_why_and_stays_pruned_when_started_again(
    tmp_path: Path, data_dir: Path
) -> None:
    records, run_dir = tmp_path / "prune", tmp_path / "run"
    config = prune_config(run_dir, data_dir, records)
    record_rival(records, 1, 100.0, rival_recipe(config))  # no kNN accuracy beats it: ours is pruned
    run_module("sogclr.pretrain", config, nproc=2)  # rank 0 decides; both ranks stop (or it would hang)

    state = read_state(run_dir / "state.json")
    assert state["status"] == "pruned" and state["step"] == STEPS and state["epoch"] == 1
    pruned = state["pruned"]
    decision = json.loads(Path(pruned["decision"]).read_text())
    assert pruned == {
        "epoch": 1, "metric": "knn_top1", "value": decision["value"], "threshold": 100.0,
        "decision": str(records / "rung-1" / "decisions" / "run.json"),
    }  # fmt: skip
    assert [row["run"] for row in decision["table"]] == ["rival", "run"] and not decision["continue"]
    knn = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["knn_top1"] for r in knn if "knn_top1" in r] == [decision["value"]]  # the logged value
    assert load_file(run_dir / "checkpoints" / "last.pt")["global_step"] == STEPS
    assert not (run_dir / "checkpoints" / "final.pt").exists()

    # Started again (a requeue whose job task never read the outcome): it finds its decision at once.
    metrics = (run_dir / "metrics.jsonl").read_text()
    run_module("sogclr.pretrain", config, nproc=2)
    assert read_state(run_dir / "state.json")["status"] == "pruned"
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # not a step trained


def test_a_requeue_across_a_rung_keeps_the_earlier_decision_and_resumes_exactly(
    tmp_path: Path, data_dir: Path
) -> None:
    records, run_dir = tmp_path / "prune", tmp_path / "run"
    config = prune_config(run_dir, data_dir, records, checkpoint={"every_steps": 4, "keep": 10})
    run_module("sogclr.pretrain", config)  # alone at the rung: it continues, to the end
    decision = RungRecords(records, 1).decision_path("run")
    assert json.loads(decision.read_text())["continue"]
    assert read_state(run_dir / "state.json")["status"] == "done"
    shutil.copy(run_dir / "checkpoints" / "final.pt", tmp_path / "straight.pt")

    # The node died after the decision and before the rung's checkpoint reached disk: what is left is
    # the save at step 8, before the rung. Meanwhile a better run recorded at the rung.
    checkpoints = run_dir / "checkpoints"
    for path in checkpoints.iterdir():
        if path.name in ("last.pt", "final.pt") or int(path.stem.split("-")[1]) > 8:
            path.unlink()
    record_rival(records, 1, 100.0, rival_recipe(config))
    decided = decision.read_bytes()
    run_module("sogclr.pretrain", config)  # the requeued attempt passes the rung again

    assert decision.read_bytes() == decided  # decided once: continue
    assert read_state(run_dir / "state.json")["status"] == "done"
    assert_same_training_state(checkpoints / "final.pt", tmp_path / "straight.pt")


def test_a_run_trained_again_from_scratch_is_judged_anew_on_its_new_value(
    tmp_path: Path, data_dir: Path
) -> None:
    records, run_dir = tmp_path / "prune", tmp_path / "run"
    config = prune_config(run_dir, data_dir, records)
    record_rival(records, 1, 100.0, rival_recipe(config))
    run_module("sogclr.pretrain", config)
    assert read_state(run_dir / "state.json")["status"] == "pruned"

    # The user deletes the run directory and trains it again; the rival's old record is gone too (it
    # is being trained again as well): alone at the rung, the new training continues to the end.
    shutil.rmtree(run_dir)
    (records / "rung-1" / "rival.json").unlink()
    config = prune_config(run_dir, data_dir, records)
    run_module("sogclr.pretrain", config)

    assert read_state(run_dir / "state.json")["status"] == "done"
    knn = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(r["knn_top1"] for r in knn if "knn_top1" in r)
    record = json.loads((records / "rung-1" / "run.json").read_text())
    assert record["value"] == first  # its new value is the one on record, for every rival to face
    decision = json.loads((records / "rung-1" / "decisions" / "run.json").read_text())
    assert decision["continue"] and [row["run"] for row in decision["table"]] == ["run"]
