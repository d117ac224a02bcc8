"""Reports: a markdown table of final metrics and matplotlib plots for a sweep, pipeline or run.

  python -m kiln.tools.report runs/sweep [--metric validation/perplexity] \
      [--lower-is-better | --higher-is-better]

The path is a sweep's workdir (sweep.json, from `kiln.tools.sweep`), a pipeline's
(comparison.json or stage folders) or one run's (summary.json). Writes `<path>/report.md`: one
row per run with its swept values and final metrics (summary.json), best first by the primary
metric (a validation metric: perplexity for pre-training, the task metric for a fine-tune; lower
is better for loss and perplexity, higher for accuracy, F1, BLEU, chrF, ROUGE and exact match),
unfinished runs last; and `<path>/plots/`: `loss.png` (training loss curves), `validation.png`
(the validation metric against the step) and, for a sweep, `<key>.png` per swept key (final
metric against it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from kiln.errors import KilnError
from kiln.tools import cli

# Task metrics in order of preference for the primary metric, then pre-training's.
TASK_METRICS = ("accuracy", "exact_match", "chrf", "rouge_l", "bleu", "macro_f1")
LM_METRICS = ("perplexity", "loss", "accuracy")
HIGHER = ("accuracy", "f1", "bleu", "chrf", "rouge", "exact_match")
LOWER = ("loss", "perplexity")
_HIDDEN = ("tokens", "examples", "perplexity_at_start")
MAX_METRICS = 6  # metric columns in the table


@dataclasses.dataclass
class Run:
    name: str
    path: str
    overrides: dict[str, Any]  # a sweep point's overrides; {} otherwise
    summary: dict[str, Any] | None  # summary.json; None while unfinished


@dataclasses.dataclass
class Workdir:
    kind: str  # sweep | pipeline | run
    path: str
    runs: list[Run]
    spec: str = ""  # a sweep's --config
    select: str = ""  # a pipeline's comparison metric


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise KilnError(f"{path} cannot be read ({e.strerror or e}).") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError.
        raise KilnError(f"{path} is not valid JSON ({e}); re-run the run that wrote it.") from None


def _read_object(path: str) -> dict[str, Any]:
    """The JSON object in `path`; a KilnError if it holds anything else."""
    value = _read_json(path)
    if not isinstance(value, dict):
        raise KilnError(
            f"{path} holds a JSON {type(value).__name__}, not an object; re-run the command that"
            " wrote it."
        )
    return value


def _run(name: str, path: str, overrides: dict[str, Any] | None = None) -> Run:
    summary_path = os.path.join(path, "summary.json")
    summary = _read_object(summary_path) if os.path.isfile(summary_path) else None
    return Run(name, path, overrides or {}, summary)


def _is_run(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("summary.json", "config.json"))


def load(path: str) -> Workdir:
    """The runs of a sweep, pipeline or single-run workdir, in their natural order."""
    if not os.path.isdir(path):
        raise KilnError(f"{path} is not a directory; give a sweep, pipeline or run workdir.")
    sweep_path = os.path.join(path, "sweep.json")
    if os.path.isfile(sweep_path):
        sweep = _read_object(sweep_path)
        try:
            points = [(p["name"], p["overrides"]) for p in sweep["points"]]
            if not all(isinstance(n, str) and isinstance(o, dict) for n, o in points):
                raise TypeError("a point's name is not a string or its overrides not an object")
            runs = [_run(name, os.path.join(path, name), overrides) for name, overrides in points]
        except (KeyError, TypeError) as e:
            raise KilnError(
                f"{sweep_path} is not a kiln.tools.sweep record (points with name and overrides:"
                f" {e!r}); re-run kiln.tools.sweep to rewrite it."
            ) from None
        return Workdir("sweep", path, runs, spec=sweep.get("config", ""))
    if _is_run(path):
        return Workdir("run", path, [_run(os.path.basename(os.path.normpath(path)), path)])
    comparison_path = os.path.join(path, "comparison.json")
    comparison = _read_object(comparison_path) if os.path.isfile(comparison_path) else {}
    named = comparison.get("stages", {})
    if not isinstance(named, dict | list) or not all(isinstance(n, str) for n in named):
        raise KilnError(
            f"{comparison_path} is not a pipeline's comparison (its stages are not named);"
            " re-run the pipeline to rewrite it."
        )
    stages = list(named) or sorted(
        name for name in os.listdir(path) if _is_run(os.path.join(path, name))
    )
    if not stages:
        raise KilnError(
            f"{path} holds no run: no sweep.json (kiln.tools.sweep), comparison.json or stage"
            " folders (a pipeline), nor summary.json/config.json (a run). Give the workdir that"
            " kiln.tools.sweep or kiln.main wrote."
        )
    runs = [_run(name, os.path.join(path, name)) for name in stages]
    return Workdir("pipeline", path, runs, select=comparison.get("select", ""))


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_keys(runs: list[Run]) -> list[str]:
    """Numeric validation/test keys of the finished runs' summaries (counts left out)."""
    keys: dict[str, None] = {}
    for run in runs:
        for key, value in (run.summary or {}).items():
            split, _, name = key.partition("/")
            if split in ("validation", "test") and _numeric(value) and name not in _HIDDEN:
                keys[key] = None
    return list(keys)


def primary_metric(workdir: Workdir, metric: str | None = None) -> str | None:
    """`metric` (or `validation/<metric>`) if given; else the pipeline's select metric, a task
    metric, or pre-training's perplexity, whichever the finished runs have first."""
    keys = metric_keys(workdir.runs)
    summaries = [run.summary for run in workdir.runs if run.summary]
    if metric:
        for key in (metric, f"validation/{metric}"):
            if any(_numeric(s.get(key)) for s in summaries):
                return key
        raise KilnError(
            f"--metric {metric}: no finished run has it; choose one of {keys or '(none yet)'}."
        )
    names = list(LM_METRICS)
    if any("task" in s for s in summaries):
        names = [*TASK_METRICS, *names]
    if workdir.select:
        names.insert(0, workdir.select)
    for name in names:
        if f"validation/{name}" in keys:
            return f"validation/{name}"
    return keys[0] if keys else None


def lower_is_better(metric: str) -> bool:
    """Loss and perplexity: lower; accuracy, F1, BLEU, chrF, ROUGE, exact match: higher."""
    name = metric.rsplit("/", 1)[-1]
    if any(word in name for word in LOWER):
        return True
    if any(word in name for word in HIGHER):
        return False
    raise KilnError(
        f"cannot tell whether a higher or a lower {metric} is better; pass --lower-is-better"
        " or --higher-is-better."
    )


def _columns(runs: list[Run], primary: str | None) -> list[str]:
    """Metric columns: the primary and its test (or validation) twin, then the metrics most runs
    have (task metrics, perplexity, accuracy); loss only where no perplexity says the same."""
    keys = metric_keys(runs)
    order = [*TASK_METRICS, "perplexity", "accuracy", "token_accuracy", "loss"]
    names = {key.partition("/")[2] for key in keys}
    if "perplexity" in names:
        keys = [k for k in keys if k.partition("/")[2] != "loss" or k == primary]

    def rank(key: str) -> tuple[int, int, bool, str]:
        split, _, name = key.partition("/")
        have = sum(
            any(f"{s}/{name}" in (run.summary or {}) for s in ("validation", "test"))
            for run in runs
        )
        return (
            -have,
            order.index(name) if name in order else len(order),
            split != "validation",
            key,
        )

    first = [primary] if primary else []
    if primary:
        split, _, name = primary.partition("/")
        twin = f"{'test' if split == 'validation' else 'validation'}/{name}"
        first += [twin] if twin in keys else []
    rest = sorted((k for k in keys if k not in first), key=rank)
    return (first + rest)[:MAX_METRICS]


def sort_runs(runs: list[Run], primary: str | None, lower: bool) -> list[Run]:
    """Finished runs best first, then those without the metric (a pipeline's pre-training
    stages when it is a task metric), then unfinished ones."""
    name = (primary or "").partition("/")[2]
    task_metric = name in TASK_METRICS and any("task" in (run.summary or {}) for run in runs)

    def key(run: Run) -> tuple[int, float]:
        if run.summary is None:
            return (2, 0.0)
        value = run.summary.get(primary) if primary else None
        if not _numeric(value) or math.isnan(value) or (task_metric and "task" not in run.summary):
            return (1, 0.0)
        return (0, value if lower else -value)

    return sorted(runs, key=key)  # Stable: ties keep the sweep's order.


def fmt(value: Any) -> str:
    """A table cell: floats to 7 significant digits (1e-6 relative), the rest as they are."""
    if isinstance(value, float):
        return f"{value:.7g}"
    return "" if value is None else str(value)


def _last_step(run: Run) -> int | None:
    steps = [row["step"] for row in _rows(run) if "step" in row]
    return max(steps) if steps else None


def table(workdir: Workdir, runs: list[Run], primary: str | None) -> str:
    """The markdown table, one row per run in the given order."""
    swept = list(dict.fromkeys(k for run in runs for k in run.overrides))
    metrics = _columns(runs, primary)
    head = ["stage" if workdir.kind == "pipeline" else "run", *swept, *metrics, "step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run.name]
        cells += [_value_text(run.overrides.get(k)) for k in swept]
        if run.summary is None:
            last = _last_step(run)
            status = "not started" if last is None else f"at step {last}"
            cells += [""] * len(metrics) + [f"unfinished ({status})"]
        else:
            cells += [fmt(run.summary.get(k)) for k in metrics]
            cells.append(fmt(run.summary.get("step")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else fmt(value)


# Plots.


def _rows(run: Run) -> list[dict[str, Any]]:
    path = os.path.join(run.path, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # A line cut short by a kill; the rest is good.
                if isinstance(row, dict) and _numeric(row.get("step")):
                    rows.append(row)
    except OSError as e:
        raise KilnError(f"{path} cannot be read ({e.strerror or e}).") from None
    return rows


def curve(run: Run, key: str) -> tuple[list[int], list[float]]:
    """`key` against the step from metrics.jsonl; a step logged twice (a resumed run repeats the
    steps after its last checkpoint) keeps its last value."""
    points = {row["step"]: row[key] for row in _rows(run) if _numeric(row.get(key))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_curves(runs: list[Run], key: str, path: str, title: str) -> bool:
    curves = [(run.name, *curve(run, key)) for run in runs]
    curves = [c for c in curves if c[1]]
    if not curves:
        return False
    plt = _pyplot()
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
        if run.summary and key in run.overrides and _numeric(run.summary.get(primary))
    ]
    if len({repr(x) for x, _ in points}) < 2:
        return False
    numeric = all(_numeric(x) for x, _ in points)
    keyed = [(x if numeric else _value_text(x), y) for x, y in points]
    xs = sorted({x for x, _ in keyed}) if numeric else list(dict.fromkeys(x for x, _ in keyed))
    position = {x: x if numeric else i for i, x in enumerate(xs)}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([position[x] for x, _ in keyed], [y for _, y in keyed], alpha=0.7, label="run")
    means = [statistics.mean(y for x, y in keyed if x == v) for v in xs]
    ax.plot([position[x] for x in xs], means, color="gray", linewidth=1, label="mean")
    if not numeric:
        ax.set_xticks(range(len(xs)), xs)
    if numeric and x_scale(xs) == "log":
        ax.set_xscale("log")
    elif numeric and len(xs) <= 10:
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
    logged = {k for run in workdir.runs for row in _rows(run) for k in row}
    candidates = [primary] if primary and primary.startswith("validation/") else []
    candidates += ["validation/perplexity", "validation/loss"]
    key = next((k for k in candidates if k in logged), None)
    validation = os.path.join(out_dir, "validation.png")
    if key and _plot_curves(workdir.runs, key, validation, f"{key} during training"):
        written.append(validation)
    if workdir.kind == "sweep" and primary:
        for swept in dict.fromkeys(k for run in workdir.runs for k in run.overrides):
            path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9._-]", "-", swept) + ".png")
            if _plot_key(workdir.runs, swept, primary, path):
                written.append(path)
    return written


def write_report(
    path: str, metric: str | None = None, lower: bool | None = None
) -> tuple[str, list[str], str]:
    """Writes `<path>/report.md` and `<path>/plots/*.png`; returns the report's path, the
    plots' paths and the markdown. `metric`/`lower` override the primary metric and its
    direction."""
    workdir = load(path)
    primary = primary_metric(workdir, metric)
    if primary and lower is None:
        lower = lower_is_better(primary)
    runs = sort_runs(workdir.runs, primary, bool(lower))
    finished = [run for run in runs if run.summary is not None]
    title = {"sweep": "Sweep", "pipeline": "Pipeline", "run": "Run"}[workdir.kind]
    lines = [f"# {title} report: {path}", ""]
    what = f"Sweep of `{workdir.spec}`: " if workdir.kind == "sweep" else ""
    lines.append(f"{what}{len(runs)} runs, {len(finished)} finished.")
    if primary:
        best = runs[0].summary or {}
        direction = "lower" if lower else "higher"
        shown = f"; best: {runs[0].name} ({fmt(best[primary])})" if primary in best else ""
        lines.append(f"Sorted by {primary} ({direction} is better){shown}.")
    markdown = table(workdir, runs, primary)
    lines += ["", markdown]
    written = plots(workdir, primary)
    if written:
        lines.append("## Plots\n")
        for png in written:
            rel = os.path.relpath(png, path)
            lines.append(f"![{os.path.splitext(os.path.basename(png))[0]}]({rel})\n")
    report_path = os.path.join(path, "report.md")
    with open(report_path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return report_path, written, markdown


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.report", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("path", help="a sweep, pipeline or run workdir")
    p.add_argument("--metric", help="sort by this summary key (default: a validation metric)")
    direction = p.add_mutually_exclusive_group()
    direction.add_argument("--lower-is-better", dest="lower", action="store_true", default=None)
    direction.add_argument("--higher-is-better", dest="lower", action="store_false")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.run("kiln.tools.report", lambda: _main(args))


def _main(args: argparse.Namespace) -> None:
    try:
        report_path, written, markdown = write_report(args.path, args.metric, args.lower)
    except OSError as e:  # The report or a plot could not be written.
        raise KilnError(
            f"writing the report into {args.path} failed: {e.strerror or e}"
            f"{f' ({e.filename})' if e.filename else ''}. Make it writable or free some space."
        ) from None
    print(markdown)
    where = f" and {len(written)} plots in {os.path.join(args.path, 'plots')}/" if written else ""
    print(f"Wrote {report_path}{where}")


if __name__ == "__main__":
    sys.exit(main())
