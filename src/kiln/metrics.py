"""Where metrics go: metrics.jsonl, TensorBoard event files and a progress line (process 0)."""

import json
import math
import os
import sys
import time
from typing import Any

import jax

from kiln import flops
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


class StepMetrics:
    """Pulls a step's metrics one step late, checks them (`guard`), and logs at `log_every`."""

    def __init__(
        self,
        config: Any,
        writer: MetricsWriter,
        start_step: int,
        shapes: dict,
        guard: Any,  # divergence.Guard: its check(step, values) raises on divergence
    ) -> None:
        self.config, self.writer, self.guard = config, writer, guard
        self.tokens_per_step, self.flops_per_step = flops.step_cost(
            config.model.to_dict(), shapes, config.data.global_batch_size
        )
        self.peak = flops.peak_flops_per_device(config.model.dtype) * jax.device_count()
        self.pending: tuple[int, dict] | None = None
        self.restart(start_step)

    def restart(self, step: int) -> None:
        """Forgets the pending step and the timing: training goes on from `step`."""
        self.pending = None
        self.mark = (step, None)  # (step, time) of the last throughput measurement
        self.start = (step, None)

    def push(self, step: int, device_metrics: dict) -> None:
        self.flush()
        self.pending = (step, device_metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, device_metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        self.guard.check(step, values)  # Raises divergence.Diverged.
        now = time.perf_counter()
        log_now = step % self.config.train.log_every == 0 or step == self.config.train.steps
        eta = float("nan")
        if self.mark[1] is None:  # The first step includes compilation: time from its end.
            self.mark = self.start = (step, now)
        elif log_now:
            seconds = now - self.mark[1]
            tokens_per_sec = (step - self.mark[0]) * self.tokens_per_step / max(seconds, 1e-9)
            values["tokens_per_sec"] = tokens_per_sec
            values["mfu"] = tokens_per_sec / self.tokens_per_step * self.flops_per_step / self.peak
            self.mark = (step, now)
            per_step = (now - self.start[1]) / max(step - self.start[0], 1)
            eta = per_step * (self.config.train.steps - step)
        if log_now:
            log(progress_line(step, self.config.train.steps, values, eta))
            self.writer.write(step, {f"train/{k}": v for k, v in values.items()})


def log_eval(writer: MetricsWriter, step: int, split: str, result: dict) -> None:
    """An evaluation's metrics under `<split>/`, and its line on the console."""
    result = {k: v for k, v in result.items() if k != "predictions"}
    writer.write(step, {f"{split}/{k}": v for k, v in result.items()})
    shown = [f"loss {result['loss']:.4f}", f"perplexity {result['perplexity']:.2f}"]
    shown += [f"{k} {v:.3f}" for k, v in result.items() if k not in _NOT_SHOWN]
    log(f"step {step} | {split} " + " | ".join(shown))


_NOT_SHOWN = ("loss", "perplexity", "tokens")
