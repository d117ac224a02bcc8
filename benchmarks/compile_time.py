"""Compile time and compiled memory of the train step, unrolled vs `model.scan_layers`.

  .venv/bin/python benchmarks/compile_time.py [--config gpt:small] [--layers 4 24]

For each depth, builds the config's train step with the blocks unrolled and scanned, and times
tracing + lowering and XLA compilation separately (no compilation cache), then runs 2 steps
for the step time. Appends the table to benchmarks/RESULTS.md.
"""

import argparse
import time

import common
import jax
from train_throughput import apply_overrides

from kiln import checkpoint, sharding
from kiln.tools import fits


def measure(spec: str, n_layers: int, scan: bool, batch: int) -> str:
    config = common.load_spec(spec)
    apply_overrides(
        config,
        [
            f"model.n_layers={n_layers}",
            f"model.scan_layers={scan}",
            f"data.global_batch_size={batch}",
        ],
    )
    step, state, mesh, abstract, shardings = common.kiln_train_step(config)
    batch_arrays = jax.device_put(
        fits.synthetic_batch(config, batch, 0), sharding.batch_sharding(mesh)
    )
    start = time.perf_counter()
    lowered = step.lower(checkpoint.abstract_like(abstract, shardings), batch_arrays)
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    state, out = compiled(state, batch_arrays)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(2):
        state, out = compiled(state, batch_arrays)
    jax.block_until_ready(out)
    step_ms = 1000 * (time.perf_counter() - start) / 2
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return (
        f"| {spec} | {n_layers} | {'scan' if scan else 'unrolled'} | {lower_s:.1f} |"
        f" {compile_s:.1f} | {step_ms:,.0f} | {temp:,.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="gpt:small")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 24])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    lines = [
        "| config | layers | blocks | trace + lower s | compile s | step ms | temporaries MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_layers in args.layers:
        for scan in (False, True):
            lines.append(measure(args.config, n_layers, scan, args.batch))
            print(lines[-1], flush=True)
    common.record(
        "compile_time",
        f"Batch {args.batch}, float32, no compilation cache; step ms = mean of 2 steps after"
        " the first; temporaries = the compiled step's scratch memory (XLA memory_analysis).",
        "\n".join(lines),
        None if args.no_append else str(common.RESULTS),
    )


if __name__ == "__main__":
    main()
