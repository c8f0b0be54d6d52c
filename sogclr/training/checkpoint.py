"""Checkpoints that let a run continue exactly: atomic files, a keep policy, and a save policy.

Layout of a checkpoint directory:
    ckpt-<global step>.pt   the newest `keep` saves
    last.pt                 the newest save (a hard link to the newest ckpt-*.pt, so it costs no space)
    final.pt                the checkpoint at the end of training, never rotated away

Every file holds only tensors and primitive containers, so it loads with `torch.load(weights_only=True)`:
RNG states are stored as tensors, the config as a JSON-like dict. A file that fails to load (truncated by
a crash, corrupt) is skipped with a warning in favour of the next older one.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sogclr.contract.atomic import fsync_dir, write_atomic
from sogclr.contract.config import CheckpointConfig

LAST = "last.pt"
FINAL = "final.pt"
_STEP_FILE = re.compile(r"ckpt-(\d+)\.pt")


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically: a crash leaves either the old file or the new one."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _link_atomic(source: Path, target: Path) -> None:
    """Make `target` name the same file as `source`, replacing it atomically (copy if links fail)."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def load_file(path: Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU; only tensors and primitive containers are accepted."""
    return torch.load(path, map_location="cpu", weights_only=True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and Python, as tensors and numbers."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "internal": torch.tensor(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in cuda_states_to_restore(state["cuda"], torch.cuda.device_count()):
            torch.cuda.set_rng_state(cuda_state, device)
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))


def cuda_states_to_restore(saved: list[torch.Tensor], visible: int) -> list[tuple[int, torch.Tensor]]:
    """(device, state) for the CUDA generators to restore: one state per GPU the saving process saw, and
    a requeue may land on a node with fewer (or more) GPUs, so as many as both have. Nothing in training
    draws from them (augmentations are seeded per sample): their state only has to be restorable."""
    return list(enumerate(saved[:visible]))


def _step_files(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of the step-named checkpoints, newest first."""
    found = [(int(m.group(1)), p) for p in directory.glob("ckpt-*.pt") if (m := _STEP_FILE.fullmatch(p.name))]
    return sorted(found, reverse=True)


class CheckpointManager:
    """Saves on rank 0 under a policy (every N minutes, every N steps, on demand) and finds the newest.

    Time is measured on this process's clock; in a multi-rank run only rank 0's verdict should count
    (the training loop agrees on it over the control group), so every rank saves at the same step.
    """

    def __init__(
        self,
        directory: str | Path,
        policy: CheckpointConfig,
        is_main: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = Path(directory)
        self.policy = policy
        self.is_main = is_main
        self.clock = clock
        self.last_save = clock()

    def time_due(self) -> bool:
        return self.clock() - self.last_save >= 60.0 * self.policy.every_minutes

    def step_due(self, global_step: int) -> bool:
        every = self.policy.every_steps
        return every is not None and global_step % every == 0

    def save(self, payload: dict[str, Any], global_step: int) -> Path | None:
        """Write `ckpt-<step>.pt`, point `last.pt` at it, drop saves beyond `keep`; rank 0 only."""
        self.last_save = self.clock()
        if not self.is_main:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"ckpt-{global_step:09d}.pt"
        save_atomic(payload, path)
        _link_atomic(path, self.directory / LAST)
        for _, old in _step_files(self.directory)[self.policy.keep :]:
            old.unlink()
        return path

    def mark_final(self) -> None:
        """Keep the newest save as `final.pt` (what linear evaluation reads)."""
        if self.is_main:
            _link_atomic(self.directory / LAST, self.directory / FINAL)

    def load_latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest checkpoint that loads, with its path, or None; unreadable files are skipped with
        a warning.

        The step files go first, newest first: `last.pt` names an older step when a save was killed
        between writing its step file and linking `last.pt` to it. `last.pt` is the fallback (a
        directory without step files).
        """
        candidates = [path for _, path in _step_files(self.directory)] + [self.directory / LAST]
        tried = set()
        for path in candidates:
            if not path.exists() or (inode := path.stat().st_ino) in tried:
                continue  # last.pt and the newest ckpt-*.pt are usually one file
            tried.add(inode)
            try:
                return path, load_file(path)
            except Exception as error:  # truncated or corrupt: any of several unpickling errors
                warnings.warn(
                    f"skipping unreadable checkpoint {path}: {type(error).__name__}: {error}", stacklevel=2
                )
        return None

    def remove_temporary_files(self) -> list[Path]:
        return remove_temporary_files(self.directory)


def remove_temporary_files(directory: Path) -> list[Path]:
    """Delete what saves that were killed half-way left in `directory` (write_atomic's `.NAME.*.tmp`)."""
    leftovers = sorted(directory.glob(".*.tmp")) if directory.is_dir() else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
