"""Training processes for the end-to-end tests of the two entry points: tiny run configs, starting and
interrupting `python -m sogclr.pretrain` / `sogclr.lincls` (one process or under torchrun), and comparing
the checkpoints of two runs bit for bit. Shared by tests/sogclr/test_pretrain.py and
tests/sogclr/test_lincls.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from sogclr.contract.config import PretrainConfig, yardstick
from sogclr.contract.rungs import Contender, RungRecords
from sogclr.distributed import DistEnv
from sogclr.training.checkpoint import load_file
from testkit.tiny import TINY

SINGLE_PROCESS = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_pretrain(data_dir: Path, **overrides: object) -> dict:
    """The tiny pretraining recipe, 2 epochs, with its digits cache in `data_dir`."""
    recipe = {"data_dir": str(data_dir), "projector_out_dim": 32, "epochs": 2, "workers": 1}
    return TINY["pretrain"] | recipe | overrides


def write_config(run_dir: Path, pretrain: dict, lincls: dict | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"run_dir": str(run_dir), "pretrain": pretrain}
    if lincls is not None:
        config["lincls"] = lincls
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def command(module: str, config: Path, nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, "--config", str(config)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*torchrun, "-m", module, "--config", str(config)]


def child_env() -> dict[str, str]:
    # One thread per process: the 2-core test machine is shared, and oversubscription is slower.
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def start_module(module: str, config: Path, nproc: int = 1) -> subprocess.Popen:
    return subprocess.Popen(
        command(module, config, nproc), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def wait_ok(process: subprocess.Popen) -> None:
    output = process.communicate(timeout=600)[0].decode()
    assert process.returncode == 0, output[-3000:]


def run_module(module: str, config: Path, nproc: int = 1) -> None:
    wait_ok(start_module(module, config, nproc))


def logged_steps(metrics_dir: Path) -> list[int]:
    path = metrics_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def interrupt_at(
    config: Path, metrics_dir: Path, step: int, nproc: int = 1, module: str = "sogclr.pretrain"
) -> None:
    """Start `module`, send SIGUSR2 once `metrics_dir`/metrics.jsonl reaches `step`, expect a clean exit.

    `step=0`: as soon as the process handles SIGUSR2 (before it has data, features or a first step), so
    it stops at the first step boundary. With several ranks the signal goes to one worker only: the
    all-reduce must stop the others too.
    """
    process = start_module(module, config, nproc)
    deadline = time.monotonic() + 300
    while True:
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "training did not reach the step"
        steps = logged_steps(metrics_dir)
        if step == 0 or (steps and max(steps) >= step):
            targets = [process.pid] if nproc == 1 else _worker_pids(process.pid)[-1:]
            # Before its handler is installed, SIGUSR2 would kill the process.
            if targets and handles(targets[0], signal.SIGUSR2):
                break
        time.sleep(0.02)
    os.kill(targets[0], signal.SIGUSR2)
    wait_ok(process)


def handles(pid: int, sig: signal.Signals) -> bool:
    """Whether process `pid` has installed a handler for `sig` (Linux: SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)


def _worker_pids(agent_pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(pid) for pid in children)


def assert_same_training_state(
    path_a: Path, path_b: Path, keys: Sequence[str] = ("model", "criterion")
) -> None:
    """The checkpoints at `path_a` and `path_b` hold equal step, `keys` state_dicts and optimizer state."""
    a, b = load_file(path_a), load_file(path_b)
    assert a["global_step"] == b["global_step"]
    for key in keys:
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys() and states_a
    for param_id in states_a:
        for name, value in states_a[param_id].items():
            assert torch.equal(value, states_b[param_id][name]), f"optimizer state {param_id}.{name} differs"


def record_rival(records: Path, rung: int, value: float, pretrain: PretrainConfig, step: int = 0) -> None:
    """What a better run of the sweep recorded at `rung` before ours got there: kNN top-1 `value`,
    measured with the same settings as the runs of `pretrain`'s recipe."""
    rival = Contender("rival", "rival-training", yardstick(pretrain, "knn_top1"))
    RungRecords(records, rung).record(rival, "knn_top1", value, step)
