"""Each performance option's effect on step time and memory, in one process, interleaved.

  .venv/bin/python benchmarks/options.py [--families gpt t5] [--rounds 4] [--no-append]

At the peers.py shape (4 layers, d_model 256, seq_len 256, vocab 8192, batch 16, float32),
compiles kiln's train step once per option and runs the variants in turns (A B C A B C ...):

- default: what kiln does (2-D matmuls, plain loss, no remat);
- batched dot_general: dense layers as one dot_general on [B, L, ...] operands, what
  `layers.matmul` replaces by a 2-D [rows, in] x [in, out] matmul (patched in for this variant);
- remat=dots / remat=full: `model.remat`;
- loss_chunks=8: `train.loss_chunks`, the loss fused with the output projection.

Prints step ms (median over rounds) and the compiled step's temporary memory (XLA's
memory_analysis: what the options change), appends the table to benchmarks/RESULTS.md.
"""

import argparse
import contextlib
import statistics

import common
import jax
import jax.numpy as jnp
import peers

from kiln import checkpoint, sharding
from kiln.models import layers
from kiln.tools import fits

VARIANTS: dict[str, dict] = {
    "default": {},
    "batched dot_general": {"dot_general": True},
    "remat=dots": {"remat": "dots"},
    "remat=full": {"remat": "full"},
    "loss_chunks=8": {"loss_chunks": 8},
}


@contextlib.contextmanager
def batched_dot_general(active: bool):
    """While active, `layers.matmul` contracts [B, L, ...] operands in one dot_general (what
    XLA gets without kiln's 2-D reshape); traced steps keep what they were traced with."""
    original = layers.matmul
    if active:
        layers.matmul = lambda x, kernel, n_in=1: jnp.tensordot(x, kernel, axes=n_in)
    try:
        yield
    finally:
        layers.matmul = original


def compile_variant(family: str, overrides: dict):
    """(step, state, batch, temporary bytes) of kiln's train step with these overrides."""
    config = peers.kiln_config(family)
    config.model.remat = overrides.get("remat", config.model.remat)
    config.train.loss_chunks = overrides.get("loss_chunks", config.train.loss_chunks)
    with batched_dot_general(overrides.get("dot_general", False)):
        step, state, mesh, abstract, shardings = common.kiln_train_step(config)
        batch = jax.device_put(
            fits.synthetic_batch(config, peers.SHAPE["batch"], 0), sharding.batch_sharding(mesh)
        )
        compiled = step.lower(checkpoint.abstract_like(abstract, shardings), batch).compile()
        state, out = step(state, batch)
        jax.block_until_ready(out)
    return step, state, batch, compiled.memory_analysis().temp_size_in_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["gpt", "t5"], choices=peers.FAMILIES)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per variant per round")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    lines = [
        "| family | option | step ms | vs default | temporaries MiB |",
        "|---|---|---|---|---|",
    ]
    for family in args.families:
        runs = {}
        for name, overrides in VARIANTS.items():
            print(f"[{family}] compiling {name} ...", flush=True)
            runs[name] = [*compile_variant(family, overrides), []]
        common.interleaved_rounds(runs, args.rounds, args.steps, f"[{family}] ")
        base = statistics.median(runs["default"][4])
        for name, (*_, temp, times) in runs.items():
            ms = statistics.median(times)
            lines.append(
                f"| {family} | {name} | {1000 * ms:.0f} | {ms / base:.2f} | {temp / 2**20:,.0f} |"
            )
    common.record(
        "options",
        f"Shape {peers.SHAPE}, float32. Median of {args.rounds} interleaved rounds x"
        f" {args.steps} steps; temporaries = the compiled step's scratch memory.",
        "\n".join(lines),
        None if args.no_append else str(common.RESULTS),
    )


if __name__ == "__main__":
    main()
