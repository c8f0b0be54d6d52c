"""The login side as a login node sees it: `sogclr-submit` commands run in a fresh interpreter in which the
training stack cannot be imported, so a command that reaches for torch fails instead of loading it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Never needed to plan, submit, cancel or inspect a sweep (the trainers and the jobs import them).
TRAINING_STACK = ("torch", "torchvision")

_BLOCKED_RUN = """
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} may not be imported on the login side")
sys.meta_path.insert(0, Blocked())
{body}
"""


def without(modules: Sequence[str], body: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the Python statements `body` in a new interpreter where importing any of `modules` fails."""
    code = _BLOCKED_RUN.format(blocked=tuple(modules), body=body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def login_command(
    argv: Sequence[str], blocked: Sequence[str] = TRAINING_STACK
) -> subprocess.CompletedProcess:
    """`sogclr-submit ARGV` with `blocked` unimportable; its exit status, stdout and stderr."""
    body = f"from launch.cli import main\nsys.exit(main({list(argv)!r}))"
    return without(blocked, body, cwd=Path(__file__).resolve().parents[1])
