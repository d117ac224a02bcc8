"""kiln's train step with freed host memory kept mapped (its default) and with glibc's defaults.

  .venv/bin/python benchmarks/host_memory.py [--families gpt bert t5] [--rounds 5] [--no-append]

At the peers.py shape, two kiln worker processes per family (peer_worker.py), one with
KILN_KEEP_HOST_MEMORY=1 (`kiln.host_memory`: one malloc arena, no mmap, no trimming), one with
KILN_KEEP_HOST_MEMORY=0, take turns for several rounds after the same warm-up. Prints step ms
(median over rounds), the process's minor page faults and kernel CPU seconds per step, and its
peak RSS; appends the table to benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import statistics
import tempfile

import common
import numpy as np
import peers

from kiln import fits

VARIANTS = {"kept (default)": "1", "glibc defaults": "0"}


def bench_family(family: str, rounds: int, steps: int, tmp: str) -> list[str]:
    """Table rows of one family: both variants, interleaved."""
    config = peers.kiln_config(family)
    batch_file, shape_file = os.path.join(tmp, f"{family}.npz"), os.path.join(tmp, "shape.json")
    np.savez(batch_file, **fits.synthetic_batch(config, peers.SHAPE["batch"], seed=0))
    with open(shape_file, "w") as f:
        json.dump(peers.SHAPE, f)
    python = str(common.ROOT / ".venv" / "bin" / "python")
    workers = {}
    for name, flag in VARIANTS.items():
        env = {"KILN_KEEP_HOST_MEMORY": flag}
        workers[name] = peers.Worker("kiln", python, family, shape_file, batch_file, env)
    for r in range(rounds):
        for worker in workers.values():
            worker.run(steps)
        line = ", ".join(f"{n} {1000 * w.result.seconds[-1]:.0f} ms" for n, w in workers.items())
        print(f"[{family}] round {r + 1}/{rounds}: {line}", flush=True)
    results = {name: worker.close() for name, worker in workers.items()}
    base = results["glibc defaults"].step_time
    return [
        f"| {family} | {name} | {1000 * r.step_time:,.0f} | {base / r.step_time:.2f}x |"
        f" {statistics.median(r.minor_faults):,.0f} | {statistics.median(r.kernel_seconds):.3f} |"
        f" {r.max_rss_bytes / 2**20:,.0f} |"
        for name, r in results.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", nargs="+", default=list(peers.FAMILIES), choices=peers.FAMILIES
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    rows = [
        "| family | host memory | step ms | speed-up | minor faults / step | kernel s / step |"
        " peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            rows += bench_family(family, args.rounds, args.steps, tmp)
    description = (
        f"Command: `.venv/bin/python benchmarks/host_memory.py`. Shape {peers.SHAPE}, float32,"
        f" AdamW; two kiln processes per family, KILN_KEEP_HOST_MEMORY=1 and 0, 5 warm-up steps"
        f" each, then median of {args.rounds} interleaved rounds x {args.steps} steps."
    )
    common.record(
        "host_memory", description, "\n".join(rows), None if args.no_append else str(common.RESULTS)
    )


if __name__ == "__main__":
    main()
