"""The smallest real sweep spec (digits at 16 px, ResNet-18 at width 8, one CPU), shared by the tests.

Width 8 (`pretrain.width`, 8 channels in the first stage): measured on the project's 2-core machine,
idle, one thread, a step of 64 images takes 0.14 s against 2.2 s at torchvision's width 64 (an epoch of
22 steps: 3 s against 49 s; `python benchmarks/width.py` has the step alone). Tests that need a longer
checkpoint write (a cancel that must land while the trainers save) ask for width 64 themselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY = {
    "slurm": {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "time": "00:20:00", "signal_lead_s": 60},
    "pretrain": {
        "dataset": "digits", "image_size": 16, "arch": "resnet18", "width": 8, "projector_hidden_dim": 64,
        "projector_out_dim": 64, "epochs": 1, "batch_size": 64, "warmup_epochs": 0.5, "lr": 0.05,
        "workers": 0, "precision": "fp32", "log_every_steps": 1,
        # the launcher's tests time their faults; tests/sogclr/evaluation/test_knn.py has the monitor
        "knn_every_epochs": None,
    },
    "lincls": {"epochs": 1, "batch_size": 64, "mode": "features", "workers": 0},
}  # fmt: skip
STEPS_PER_EPOCH = 22  # 1437 training digits // 64
# Epochs of a run that a test deals a fault after its first steps (a preemption, a cancel, a lost node):
# SLURM must act while it still trains, also on a machine faster than ours. 110 steps, about 15 s on an
# idle core, where a preemption reaches the trainers seconds after its sbatch.
RUNWAY_EPOCHS = 5


def write_tiny_spec(directory: Path, name: str, **sections: Any) -> Path:
    """`<directory>/<name>.yaml`: TINY with each given section's fields overridden (None drops a section)."""
    spec = {"name": name, "output_root": str(directory / "runs")}
    for key, base in TINY.items():
        value = sections.pop(key, {})
        spec[key] = None if value is None else {**base, **value}
    spec.update(sections)
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def write_undecodable_dataset(root: Path) -> Path:
    """A `folder` dataset of 64 files named like images that are none: it passes submission (the index
    reads names, not pixels), and training fails on its first batch, at every attempt."""
    for split, count in (("train", 64), ("val", 1)):
        folder = root / split / "junk"
        folder.mkdir(parents=True)
        for number in range(count):
            (folder / f"{number:02d}.png").write_bytes(b"not a png")
    return root
