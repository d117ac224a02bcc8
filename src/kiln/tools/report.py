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
import math
import os
import sys
from collections.abc import Sequence

from kiln import seeds
from kiln.errors import KilnError
from kiln.tools import cli
from kiln.tools.report_plots import plots, x_scale  # noqa: F401 (x_scale re-exported)
from kiln.tools.report_runs import (  # noqa: F401 (load, curve re-exported)
    Run,
    Workdir,
    curve,
    fmt,
    load,
    numeric,
    rows,
    value_text,
)

# Task metrics in order of preference for the primary metric, then pre-training's.
TASK_METRICS = ("accuracy", "exact_match", "chrf", "rouge_l", "bleu", "macro_f1")
LM_METRICS = ("perplexity", "loss", "accuracy")
HIGHER = ("accuracy", "f1", "bleu", "chrf", "rouge", "exact_match")
LOWER = ("loss", "perplexity")
_HIDDEN = ("tokens", "examples", "perplexity_at_start")
MAX_METRICS = 6  # metric columns in the table
SPLITS = ("validation", "test")


def metric_keys(runs: list[Run]) -> list[str]:
    """Numeric validation/test keys of the finished runs' summaries (counts left out)."""
    keys: dict[str, None] = {}
    for run in runs:
        for key, value in (run.summary or {}).items():
            split, _, name = key.partition("/")
            if split in ("validation", "test") and numeric(value) and name not in _HIDDEN:
                keys[key] = None
    return list(keys)


def primary_metric(workdir: Workdir, metric: str | None = None) -> str | None:
    """`metric` (or `validation/<metric>`) if given; else the pipeline's select metric, a task
    metric, or pre-training's perplexity, whichever the finished runs have first."""
    keys = metric_keys(workdir.runs)
    summaries = [run.summary for run in workdir.runs if run.summary]
    if metric:
        for key in (metric, f"validation/{metric}"):
            if any(numeric(s.get(key)) for s in summaries):
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
    keys = [k for k in metric_keys(runs) if not k.partition("/")[2].startswith("source/")]
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
        if not numeric(value) or math.isnan(value) or (task_metric and "task" not in run.summary):
            return (1, 0.0)
        return (0, value if lower else -value)

    return sorted(runs, key=key)  # Stable: ties keep the sweep's order.


def _last_step(run: Run) -> int | None:
    steps = [row["step"] for row in rows(run) if "step" in row]
    return max(steps) if steps else None


def table(workdir: Workdir, runs: list[Run], primary: str | None) -> str:
    """The markdown table, one row per run in the given order."""
    swept = list(dict.fromkeys(k for run in runs for k in run.overrides))
    metrics = _columns(runs, primary)
    head = ["stage" if workdir.kind == "pipeline" else "run", *swept, *metrics, "step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        cells = [run.name]
        cells += [value_text(run.overrides.get(k)) for k in swept]
        if run.summary is None:
            last = _last_step(run)
            status = "not started" if last is None else f"at step {last}"
            cells += [""] * len(metrics) + [f"unfinished ({status})"]
        else:
            cells += [fmt(run.summary.get(k)) for k in metrics]
            cells.append(fmt(run.summary.get("step")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def source_table(runs: list[Run]) -> str:
    """Each run's final validation and test loss per mixture source (`source/<name>/loss`
    keys); "" when no run has them."""
    names = list(
        dict.fromkeys(
            key.split("/")[2]
            for run in runs
            for key in run.summary or {}
            if key.startswith(("validation/source/", "test/source/")) and key.endswith("/loss")
        )
    )
    if not names:
        return ""
    head = ["run", *(f"{n} ({s})" for n in names for s in ("validation", "test")), "step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        if run.summary is None:
            continue
        cells = [run.name]
        cells += [fmt(run.summary.get(f"{s}/source/{n}/loss")) for n in names for s in SPLITS]
        lines.append("| " + " | ".join([*cells, fmt(run.summary.get("step"))]) + " |")
    return "\n".join(lines) + "\n"


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
    # Mean ± std over seed replicates (a sweep's `seed` points, a pipeline's `_seed<N>` stages).
    markdown += seeds.report_section(
        [(r.name, r.overrides, r.summary) for r in workdir.runs], _columns(runs, primary)
    )
    lines += ["", markdown]
    if by_source := source_table(runs):
        lines += ["## Loss by source\n", "Each mixture source's final loss (`data.sources`).\n"]
        lines += [by_source]
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
