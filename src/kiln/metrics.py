"""Where metrics go: metrics.jsonl, TensorBoard event files and a progress line (process 0)."""

import json
import math
import os
import sys
from typing import Any

import jax

from kiln import workdir as workdir_lib


class MetricsWriter:
    """Appends one JSON line per call and mirrors scalars to TensorBoard; no-op off process 0."""

    def __init__(self, workdir: str | os.PathLike) -> None:
        self._enabled = jax.process_index() == 0
        if not self._enabled:
            return
        from tensorboardX import SummaryWriter  # Imported here: only process 0 writes.

        self._jsonl = open(os.path.join(workdir, workdir_lib.METRICS), "a")
        self._tb = SummaryWriter(os.path.join(workdir, workdir_lib.TENSORBOARD))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self._enabled:
            return
        row = {"step": int(step), **{k: _to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, float | int):
                self._tb.add_scalar(key, value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._enabled:
            self._jsonl.close()
            self._tb.close()


def _to_python(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def log(message: str) -> None:
    """Prints from process 0 only."""
    if jax.process_index() == 0:
        print(message, file=sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress_line(step: int, total: int, metrics: dict[str, float], eta_seconds: float) -> str:
    """`step 20/400 | loss 5.12 | lr 3.0e-03 | 9,000 tok/s | MFU 30.0% | ETA 1m05s`."""
    line = f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e}"
    if "tokens_per_sec" in metrics:
        line += f" | {metrics['tokens_per_sec']:,.0f} tok/s | MFU {100 * metrics['mfu']:.1f}%"
    else:
        line += " | (includes compilation)"
    return line + f" | ETA {format_duration(eta_seconds)}"
