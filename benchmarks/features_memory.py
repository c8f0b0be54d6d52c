"""Linear evaluation's `features` mode: memory per rank with the features gathered onto every rank (before)
against kept sharded (now), on 2 gloo ranks with synthetic features of N rows x d, then scaled to
ImageNet-1K (1,281,167 x 2048 fp32) on 8 ranks.

    python benchmarks/features_memory.py                  # N = 200,000, d = 512, 2 ranks
    python benchmarks/features_memory.py --rows 400000 --dim 256

Each rank holds its extracted shard (rows rank, rank + world, ...), as `extract_shard` returns it. Before,
every rank then gathered all shards into one [N, d] matrix (`gather_shards`, what lincls did and the kNN
monitor still does for its bank subset) and held it; rank 0 wrote it to the cache as one file, which every
rank loaded whole on a hit. Now each rank keeps its shard and `FeatureCache` writes and loads it alone.
Measured per rank from real allocations (CPU tensors live in the process's resident memory): the peak
resident memory above that of the held shard (VmHWM, reset before each phase), what stays resident
afterwards, and the size of the cache files each rank writes and reads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

MIB = 2**20
IMAGENET_ROWS, IMAGENET_DIM, IMAGENET_RANKS = 1_281_167, 2048, 8


def kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def rank_main(rows: int, dim: int, directory: Path) -> None:
    """One rank: hold a shard, then measure both ways of going on from it."""
    import torch

    from sogclr.distributed import barrier, init_distributed
    from sogclr.evaluation.features import FeatureCache, gather_shards
    from sogclr.training.checkpoint import load_file, save_atomic

    env = init_distributed()
    length = len(range(env.rank, rows, env.world_size))
    shard = (torch.randn(length, dim), torch.randint(0, 1000, (length,)))
    result = {"shard": shard[0].nbytes + shard[1].nbytes}

    def measure(name: str, phase) -> None:
        barrier(env)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        before = kib("VmRSS")
        held = phase()
        result[name] = {"peak": kib("VmHWM") - before, "held": kib("VmRSS") - before}
        del held

    def gathered() -> tuple:
        full = gather_shards(shard[0], rows, env), gather_shards(shard[1], rows, env)
        whole = directory / "before" / "train.pt"
        if env.is_main:
            save_atomic({"features": full[0], "targets": full[1]}, whole)
        barrier(env)
        result["file_written"] = whole.stat().st_size if env.is_main else 0
        result["file_read"] = whole.stat().st_size
        return full

    def sharded() -> tuple:
        cache = FeatureCache(directory / "now", env)
        kept = cache.get({"split": "train"}, lambda: shard)
        result["file_now"] = (
            cache.path({"split": "train", "shard": f"{env.rank}/{env.world_size}"}).stat().st_size
        )
        return kept

    def hit(path: Path) -> tuple:
        payload = load_file(path)
        return payload["features"], payload["targets"]

    measure("before", gathered)
    measure("now", sharded)
    measure("hit_before", lambda: hit(directory / "before" / "train.pt"))
    shard_file = next((directory / "now").glob(f"train-*-{env.rank}of{env.world_size}.pt"))
    measure("hit_now", lambda: hit(shard_file))
    print(json.dumps({"rank": env.rank, **result}), flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="features-memory-") as directory:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed,
        # so that each phase starts from what is really held (glibc would otherwise raise the threshold
        # after the first free and serve later tensors from memory it keeps resident).
        env |= {"WORLD_SIZE": str(args.ranks), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
        ranks = [
            subprocess.Popen(
                [sys.executable, __file__, "--rank-of", str(args.rows), str(args.dim), directory],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=subprocess.PIPE,
                text=True,
            )
            for rank in range(args.ranks)
        ]
        results = [json.loads(rank.communicate()[0].splitlines()[-1]) for rank in ranks]
    report(args, sorted(results, key=lambda result: result["rank"]))


def report(args: argparse.Namespace, results: list[dict]) -> None:
    matrix = args.rows * (args.dim + 2) * 4  # features and int64 targets
    print(
        f"N = {args.rows:,} rows x d = {args.dim} fp32 (+ int64 targets): {matrix / MIB:,.0f} MiB; "
        f"{args.ranks} gloo ranks; MiB per rank beyond its extracted shard "
        f"({results[0]['shard'] / MIB:,.0f} MiB)"
    )
    print(
        "| rank | peak, gathered (before) | held, gathered | peak, sharded (now) | held, sharded "
        "| cache written before / now | cache hit: peak before / now |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        cells = [r["before"]["peak"], r["before"]["held"], r["now"]["peak"], r["now"]["held"]]
        print(
            f"| {r['rank']} | "
            + " | ".join(f"{cell / MIB:,.0f}" for cell in cells)
            + f" | {r['file_written'] / MIB:,.0f} / {r['file_now'] / MIB:,.0f}"
            + f" | {r['hit_before']['peak'] / MIB:,.0f} / {r['hit_now']['peak'] / MIB:,.0f} |"
        )
    main_rank = results[0]
    # Scaled by the measured multiples of the matrix: gathered, a rank holds its shard and its padded copy
    # (2/ranks of the matrix) and whole copies (the gather's buffer, the result); sharded, its shard.
    before = (main_rank["shard"] + main_rank["before"]["peak"]) / matrix
    now = (main_rank["shard"] + main_rank["now"]["peak"]) / matrix
    whole_copies = before - 2 / args.ranks
    print(
        f"peak features memory of rank 0, shard included: before {before:.2f} x the matrix "
        f"({whole_copies:.2f} whole copies + 2/{args.ranks}), now {now:.2f} x; "
        f"before / now {before / now:.1f}x"
    )
    imagenet = IMAGENET_ROWS * (IMAGENET_DIM + 2) * 4
    imagenet_before = (whole_copies + 2 / IMAGENET_RANKS) * imagenet
    imagenet_now = now * args.ranks / IMAGENET_RANKS * imagenet
    print(
        f"ImageNet-1K ({IMAGENET_ROWS:,} x {IMAGENET_DIM}, {imagenet / 1e9:.1f} GB) on {IMAGENET_RANKS} "
        f"ranks, per rank: before {imagenet_before / 1e9:.1f} GB peak, now {imagenet_now / 1e9:.1f} GB "
        f"({imagenet_before / imagenet_now:.0f}x); a cache hit loads {imagenet / 1e9:.1f} GB per rank "
        f"before, {imagenet / IMAGENET_RANKS / 1e9:.1f} GB now"
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--rank-of"]:
        rank_main(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
    else:
        main()
