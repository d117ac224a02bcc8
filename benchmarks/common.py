"""What every benchmark shares: the machine description, configs by `family:size[:style]`, and
writing a result section (printed, and appended to benchmarks/RESULTS.md)."""

import datetime
import os
import pathlib
import platform

import jax
import ml_collections

from kiln import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


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
