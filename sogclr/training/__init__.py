"""The training runtime around the algorithm: one resumable loop that both entry points drive.

loop        Session (resume, step boundaries, stop signals, saves) and run_epochs
checkpoint  atomic checkpoints with RNG state; the newest one that loads
metrics     metrics.jsonl, throughput, u statistics
tracking    optional Weights & Biases mirror
watchdog    a trainer that makes no progress records `failed: stalled` and exits
datacheck   the data a checkpoint was trained on, checked at resume
prune       one run's side of successive halving (the rule: sogclr.contract.rungs)
"""

from sogclr.training.checkpoint import CheckpointManager
from sogclr.training.loop import Progress, Session, run_epochs, run_process
from sogclr.training.metrics import MetricsLogger
from sogclr.training.prune import Pruner
from sogclr.training.watchdog import Watchdog

__all__ = [
    "CheckpointManager",
    "MetricsLogger",
    "Progress",
    "Pruner",
    "Session",
    "Watchdog",
    "run_epochs",
    "run_process",
]
