"""What every benchmark shares: the machine description, configs by `family:size[:style]`, and
writing a result section (printed, and appended to benchmarks/RESULTS.md)."""

import datetime
import os
import pathlib
import platform
import time

import jax
import ml_collections

from kiln import build, config_lib
from kiln.tools import host_memory

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

# Benchmarks time kiln as its entry points run it, with freed host memory kept mapped
# (kiln.tools.host_memory; KILN_KEEP_HOST_MEMORY=0 opts out). Every benchmark script imports this
# module before anything starts JAX's CPU backend, so the setting is applied here.
host_memory.keep_freed_memory()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return (
        f"{jax.device_count()} x {device.device_kind} ({device.platform}); host {cpu},"
        f" {os.cpu_count()} cores; jax {jax.__version__}, Python {platform.python_version()}"
    )


def load_spec(spec: str) -> ml_collections.ConfigDict:
    """The pre-training config `family:size[:style]` (experiments/<family>/pretrain.py)."""
    family, size, *style = spec.split(":")
    arg = f"size={size}" + (f",style={style[0]}" if style else "")
    return config_lib.load_config(str(ROOT / f"experiments/{family}/pretrain.py") + ":" + arg)


def kiln_train_step(config: ml_collections.ConfigDict) -> tuple:
    """kiln's jitted, donated train step for `config` over every local device, and a fresh
    state: (step, state, mesh, abstract state, state shardings)."""
    built = build.build(config)
    state = built.fresh_state(0)
    return built.train_step, state, built.mesh, built.abstract, built.shardings


def record(name: str, description: str, table: str, results: str | None = str(RESULTS)) -> None:
    """Prints a `## name, date` section (the machine, `description`, the table) and appends it
    to `results` (None: print only)."""
    text = (
        f"\n## {name}, {datetime.date.today()}\n\nMachine: {machine()}. {description}\n\n{table}\n"
    )
    print(text)
    if results:
        with open(results, "a") as f:
            f.write(text)


def interleaved_rounds(runs: dict[str, list], rounds: int, steps: int, label: str = "") -> None:
    """Times `steps` train steps of every run per round, the runs interleaved so machine noise
    falls on all alike. A run is a list [step_fn, state, batch, ..., times]: the state is
    carried on and each round's seconds per step appended to its last item."""
    for r in range(rounds):
        for run in runs.values():
            step, state, batch, times = run[0], run[1], run[2], run[-1]
            start = time.perf_counter()
            for _ in range(steps):
                state, out = step(state, batch)
            jax.block_until_ready(out)
            times.append((time.perf_counter() - start) / steps)
            run[1] = state
        print(f"{label}round {r + 1}/{rounds}", flush=True)
