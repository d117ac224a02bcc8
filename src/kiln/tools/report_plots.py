"""`kiln.tools.report`'s plots: training and validation curves, per-source validation loss, and
a sweep's final metric against each swept key (matplotlib, Agg)."""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Sequence
from typing import Any

from kiln.tools.report_runs import Run, Workdir, curve, numeric, rows, value_text


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SOURCE_LOSS = re.compile(r"^validation/source/(.+)/loss$")  # a mixture source's eval loss


def _plot_curves(runs: list[Run], key: str, path: str, title: str) -> bool:
    return _draw([(run.name, *curve(run, key)) for run in runs], key, path, title)


def _plot_sources(runs: list[Run], path: str) -> bool:
    """Each mixture source's validation loss against the step (a line per run and source)."""
    logged = {k: None for run in runs for row in rows(run) for k in row if SOURCE_LOSS.match(k)}
    curves = []
    for run in runs:
        for key in logged:
            label = SOURCE_LOSS.match(key).group(1)
            curves.append((label if len(runs) == 1 else f"{run.name}: {label}", *curve(run, key)))
    return _draw(curves, "validation loss", path, "validation loss by source")


def _draw(curves: list[tuple[str, list, list]], key: str, path: str, title: str) -> bool:
    """One line per (label, steps, values) with values; False (nothing written) if none."""
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, steps, values in curves:
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=name)
    ax.set(xlabel="step", ylabel=key, title=title)
    if "perplexity" in key and all(v > 0 for c in curves for v in c[2]):
        ax.set_yscale("log")
    if len(curves) <= 20:
        ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def x_scale(values: Sequence[float]) -> str:
    """`log` for positive values spanning more than a decade (learning rates), else `linear`."""
    return "log" if min(values) > 0 and max(values) / min(values) > 10 else "linear"


def _plot_key(runs: list[Run], key: str, primary: str, path: str) -> bool:
    """The final primary metric against a swept key's value (log x over more than a decade)."""
    points = [
        (run.overrides[key], run.summary[primary])
        for run in runs
        if run.summary and key in run.overrides and numeric(run.summary.get(primary))
    ]
    if len({repr(x) for x, _ in points}) < 2:
        return False
    all_numeric = all(numeric(x) for x, _ in points)
    keyed = [(x if all_numeric else value_text(x), y) for x, y in points]
    xs = sorted({x for x, _ in keyed}) if all_numeric else list(dict.fromkeys(x for x, _ in keyed))
    position = {x: x if all_numeric else i for i, x in enumerate(xs)}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([position[x] for x, _ in keyed], [y for _, y in keyed], alpha=0.7, label="run")
    means = [statistics.mean(y for x, y in keyed if x == v) for v in xs]
    ax.plot([position[x] for x in xs], means, color="gray", linewidth=1, label="mean")
    if not all_numeric:
        ax.set_xticks(range(len(xs)), xs)
    if all_numeric and x_scale(xs) == "log":
        ax.set_xscale("log")
    elif all_numeric and len(xs) <= 10:
        ax.set_xticks(xs)  # seeds 0 and 1, not 0.0, 0.2, ...
    ax.set(xlabel=key, ylabel=f"final {primary}", title=f"{primary} vs {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plots(workdir: Workdir, primary: str | None) -> list[str]:
    """Writes the PNGs into `<path>/plots/`; returns their paths."""
    out_dir = os.path.join(workdir.path, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    loss = os.path.join(out_dir, "loss.png")
    if _plot_curves(workdir.runs, "train/loss", loss, "training loss"):
        written.append(loss)
    logged = {k for run in workdir.runs for row in rows(run) for k in row}
    candidates = [primary] if primary and primary.startswith("validation/") else []
    candidates += ["validation/perplexity", "validation/loss"]
    key = next((k for k in candidates if k in logged), None)
    validation = os.path.join(out_dir, "validation.png")
    if key and _plot_curves(workdir.runs, key, validation, f"{key} during training"):
        written.append(validation)
    sources = os.path.join(out_dir, "sources.png")
    if _plot_sources(workdir.runs, sources):
        written.append(sources)
    if workdir.kind == "sweep" and primary:
        for swept in dict.fromkeys(k for run in workdir.runs for k in run.overrides):
            path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]", "-", swept) + ".png")
            if _plot_key(workdir.runs, swept, primary, path):
                written.append(path)
    return written
