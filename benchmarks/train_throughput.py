"""Train-step throughput: tokens/s, step time and MFU for experiment configs.

  .venv/bin/python benchmarks/train_throughput.py --configs gpt:tiny gpt:small gpt:small:modern

Each config is `family:size[:style]` for experiments/<family>/pretrain.py. The step is the real
jitted, sharded, donated `kiln.train.train_step` on random tokens passed through the config's
objective (no tokenizer or input pipeline), over a mesh of every local device. Tokens count
encoder plus decoder tokens for t5; FLOPs follow kiln/flops.py. Prints a markdown table and
appends it, with the machine description, to benchmarks/RESULTS.md.
"""

import argparse
import ast
import resource
import statistics
import time

import common
import jax

from kiln import flops, sharding, validation
from kiln.tools import fits


def apply_overrides(config, overrides: list[str]) -> None:
    """`section.key=value` strings (values parsed as Python literals, else strings)."""
    for item in overrides:
        dotted, _, raw = item.partition("=")
        section, key = dotted.split(".")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        config[section][key] = value


def measure(spec: str, steps: int, repeats: int, overrides: list[str] = ()) -> dict:
    config = common.load_spec(spec)
    apply_overrides(config, overrides)
    mesh_shape = validation.validate(config, jax.device_count())
    step, state, mesh, _, _ = common.kiln_train_step(config)
    rows = config.data.global_batch_size
    batches = [
        jax.device_put(fits.synthetic_batch(config, rows, i), sharding.batch_sharding(mesh))
        for i in range(2)
    ]
    start = time.perf_counter()
    state, out = step(state, batches[0])  # compile
    jax.block_until_ready(out)
    first_step = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(steps):
            state, out = step(state, batches[i % 2])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
    step_time = statistics.median(times)
    shapes = {k: v.shape for k, v in batches[0].items()}
    tokens, step_flops = flops.step_cost(config.model.to_dict(), shapes, rows)
    params = sum(x.size for x in jax.tree.leaves(state.params))
    peak = flops.peak_flops_per_device(config.model.dtype) * jax.device_count()
    keys = ("inputs", "encoder_inputs", "decoder_inputs")
    lengths = "+".join(str(shapes[k][1]) for k in keys if k in shapes)
    return {
        "config": spec,
        "params": params,
        "batch": f"{rows}x{lengths}",
        "mesh": mesh_shape,
        "dtype": config.model.dtype,
        "first_step_s": first_step,
        "step_ms": 1000 * step_time,
        "tokens_per_sec": tokens / step_time,
        "mfu": step_flops / step_time / peak,
        "peak_memory": peak_memory(),
    }


def peak_memory() -> str:
    """The accelerator's peak bytes in use where it reports them, else the host's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.1f} GiB device"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS"


def table(rows: list[dict]) -> str:
    lines = [
        "| config | parameters | batch | mesh (d,f,t) | dtype | compile + step 1 s | step ms |"
        " tokens/s | MFU | peak memory |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['mesh']} |"
            f" {r['dtype']} | {r['first_step_s']:.1f} | {r['step_ms']:.1f} |"
            f" {r['tokens_per_sec']:,.0f} | {100 * r['mfu']:.1f}% | {r['peak_memory']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["gpt:tiny", "gpt:small"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="median over repeats")
    parser.add_argument("--results", default=str(common.RESULTS))
    parser.add_argument(
        "--set", nargs="*", default=[], help="overrides for every config: model.dtype=bfloat16 ..."
    )
    args = parser.parse_args()
    rows = [measure(spec, args.steps, args.repeats, args.set) for spec in args.configs]
    dtypes = sorted({r["dtype"] for r in rows})
    peaks = ", ".join(f"{flops.peak_flops_per_device(d) / 1e9:,.0f} ({d})" for d in dtypes)
    common.record(
        "train_throughput",
        f"MFU peak GFLOP/s per device: {peaks} (data sheet on accelerators, a measured jitted"
        f" matmul on CPUs). Median of {args.repeats} x {args.steps} steps."
        + (f" Overrides: {' '.join(args.set)}." if args.set else ""),
        table(rows),
        args.results,
    )


if __name__ == "__main__":
    main()
