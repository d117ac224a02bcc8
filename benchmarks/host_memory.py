"""Train steps with freed host memory kept mapped (kiln's default) and with glibc's defaults.

  .venv/bin/python benchmarks/host_memory.py [--families gpt bert t5] [--systems kiln hf_flax]
      [--rounds 5] [--no-append]

At the peers.py shape, two worker processes per system and family (peer_worker.py), one with
KILN_KEEP_HOST_MEMORY=1 (`kiln.tools.host_memory`: one malloc arena, no mmap, no trimming; given to
a peer by peer_worker.py), one with KILN_KEEP_HOST_MEMORY=0, all take turns for several rounds
after the same warm-up. Prints step ms (median over rounds), the speed-up over the same system
with glibc's defaults, the process's minor page faults and kernel CPU seconds per step, and its
peak RSS; appends the table to benchmarks/RESULTS.md.
"""

import argparse
import statistics
import sys
import tempfile

import common
import peers

from kiln.tools import host_memory

VARIANTS = {"kept": "1", "glibc defaults": "0"}  # values of host_memory.ENV


def bench_family(family: str, systems: list[str], rounds: int, steps: int, tmp: str) -> list[str]:
    """Table rows of one family: each system with both settings, interleaved."""
    _, shape_file, kiln_file, peer_file = peers.write_inputs(family, tmp)
    workers = {}
    for system in systems:
        python = sys.executable if system == "kiln" else str(peers.hf_python())
        data = kiln_file if system == "kiln" else peer_file
        for name, flag in VARIANTS.items():
            env = {host_memory.ENV: flag}
            workers[system, name] = peers.Worker(system, python, family, shape_file, data, env)
    for r in range(rounds):
        for worker in workers.values():
            worker.run(steps)
        line = ", ".join(
            f"{s} {n} {1000 * w.result.seconds[-1]:.0f} ms" for (s, n), w in workers.items()
        )
        print(f"[{family}] round {r + 1}/{rounds}: {line}", flush=True)
    results = {key: worker.close() for key, worker in workers.items()}
    rows = []
    for (system, name), r in results.items():
        base = results[system, "glibc defaults"].step_time
        rows.append(
            f"| {family} | {system} | {name} | {1000 * r.step_time:,.0f} |"
            f" {base / r.step_time:.2f}x | {statistics.median(r.minor_faults):,.0f} |"
            f" {statistics.median(r.kernel_seconds):.3f} | {r.max_rss_bytes / 2**20:,.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--families", nargs="+", default=list(peers.FAMILIES), choices=peers.FAMILIES
    )
    parser.add_argument(
        "--systems", nargs="+", default=["kiln", "hf_flax"], choices=["kiln", "hf_flax", "torch"]
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    rows = [
        "| family | system | host memory | step ms | speed-up | minor faults / step |"
        " kernel s / step | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            rows += bench_family(family, args.systems, args.rounds, args.steps, tmp)
    description = (
        f"Command: `.venv/bin/python benchmarks/host_memory.py`. Shape {peers.SHAPE}, float32,"
        f" AdamW; two processes per system and family, KILN_KEEP_HOST_MEMORY=1 and 0, 5 warm-up"
        f" steps each, then median of {args.rounds} interleaved rounds x {args.steps} steps;"
        f" speed-up: over the same system with glibc's defaults."
    )
    common.record(
        "host_memory", description, "\n".join(rows), None if args.no_append else str(common.RESULTS)
    )


if __name__ == "__main__":
    main()
