"""How long validating and expanding a large sweep takes (target: well under a second for 1,000 runs).

Baseline, measured in the same run: validating the same number of bare `RunConfig`s, the least work any
launcher must do per run. The ratio is our whole expansion (names, resources, checks) against that.

    python benchmarks/spec.py [--runs-per-axis 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml

from launch.spec import expand, load_spec
from sogclr.contract.config import RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs-per-axis", type=int, default=10, help="three axes: n**3 runs")
    args = parser.parse_args()
    n = args.runs_per_axis
    spec_path = Path("/tmp/sogclr-bench-spec.yaml")
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "bench",
                "slurm": {"nodes": 1, "gpus_per_node": 4},
                "pretrain": {"dataset": "digits"},
                "lincls": {"epochs": 90},
                "sweep": {
                    "product": {
                        "gamma": [round(0.05 + 0.9 * i / n, 4) for i in range(n)],
                        "temperature": [round(0.05 + 0.05 * i, 4) for i in range(n)],
                        "epochs": [100 * (i + 1) for i in range(n)],
                    }
                },
            }
        )
    )

    start = time.perf_counter()
    runs = expand(load_spec(spec_path))
    ours = time.perf_counter() - start

    base = runs[0].config.model_dump()
    start = time.perf_counter()
    for _ in runs:
        RunConfig.model_validate(base)
    baseline = time.perf_counter() - start

    print(f"runs: {len(runs)}")
    print(f"load + validate + expand: {ours * 1e3:8.1f} ms  ({ours / len(runs) * 1e6:.0f} us/run)")
    print(f"baseline (bare RunConfig validation x {len(runs)}): {baseline * 1e3:8.1f} ms")
    print(f"ratio ours / baseline: {ours / baseline:.1f}x")


if __name__ == "__main__":
    main()
