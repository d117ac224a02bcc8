"""The reproduction report: `docs/reproduction.json` (raw numbers written by
`kiln.tools.reproduce`) rendered as `docs/reproduction.md` (tables, targets) and PNG plots.

Pre-trained-then-fine-tuned ("finetune") against from-scratch ("scratch") arms per pipeline,
labeled-set size and seed, plus few-shot runs and non-neural baselines. Every number shown is
computed from the JSON; cells that are missing from it are shown as "not run yet". Metrics are
higher-is-better (accuracy, F1, BLEU, ...).
"""

from __future__ import annotations

import os
import statistics
from typing import NamedTuple

from kiln.tools.report_plots import pyplot

ARMS = {"finetune": "fine-tuned", "scratch": "scratch"}
NOT_RUN = "not run yet"
PLOTS = "reproduction"  # the plots' folder, next to the document


class Stat(NamedTuple):
    """Test metric over seeds: mean, sample std (ddof=1; 0.0 for one seed) and seed count."""

    mean: float
    std: float
    n: int


def _arm(run: dict) -> str:
    """A run's arm key: `finetune`, `scratch`, or `fewshot:<k>` (k demonstrations)."""
    if run["arm"] == "fewshot" and "shots" in run:
        return f"fewshot:{run['shots']}"
    return run["arm"]


def summarize(results: dict) -> dict[tuple[str, int, str], Stat]:
    """(pipeline, labels, arm key) -> Stat of the test metric (a seed run twice counts once)."""
    values: dict[tuple[str, int, str], dict[int, float]] = {}
    for name, pipeline in results["pipelines"].items():
        for run in pipeline.get("runs", []):
            values.setdefault((name, run["labels"], _arm(run)), {})[run["seed"]] = run["test"]
    out = {}
    for key, by_seed in values.items():
        xs = list(by_seed.values())
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out[key] = Stat(statistics.fmean(xs), std, len(xs))
    return out


def _digits(pipeline: dict) -> int:
    return 3 if pipeline.get("scale", 1.0) <= 1.0 else 1


def _cell(stat: Stat | None, d: int) -> str:
    if stat is None:
        return NOT_RUN
    if stat.n < 2:
        return f"{stat.mean:.{d}f} (n=1)"
    return f"{stat.mean:.{d}f} ± {stat.std:.{d}f} (n={stat.n})"


def _size_text(labels: int, pipeline: dict) -> str:
    return f"all ({labels:,})" if labels == pipeline.get("train_size") else f"{labels:,}"


def _sizes(pipeline: dict) -> list[int]:
    """The labeled-set sizes: the grid asked for and any other a fine-tuned or scratch run used."""
    ran = {r["labels"] for r in pipeline.get("runs", []) if r["arm"] in ARMS}
    return sorted(set(pipeline["labels"]) | ran)


def _holds(finetune: Stat | None, scratch: Stat | None) -> str:
    """`yes` if the margin exceeds the two arms' summed std with 2+ seeds each; with one seed,
    `1 seed` for a positive margin and `no` otherwise."""
    if finetune is None or scratch is None:
        return "n/a"
    if min(finetune.n, scratch.n) < 2:  # No spread yet, but a loss is a loss.
        return "1 seed" if finetune.mean > scratch.mean else "no"
    return "yes" if finetune.mean - scratch.mean > finetune.std + scratch.std else "no"


def _baselines(pipeline: dict) -> dict[str, dict[int, float]]:
    """Baseline name -> labels -> test value (first-seen name order; a later entry wins)."""
    out: dict[str, dict[int, float]] = {}
    for b in pipeline.get("baselines", []):
        out.setdefault(b["name"], {})[b["labels"]] = b["test"]
    return out


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _results_table(name: str, pipeline: dict, stats: dict) -> list[str]:
    d, baselines = _digits(pipeline), _baselines(pipeline)
    header = ["labeled examples", *ARMS.values(), "margin", "holds", *baselines]
    rows = []
    for labels in _sizes(pipeline):
        f, s = (stats.get((name, labels, arm)) for arm in ARMS)
        margin = f"{f.mean - s.mean:+.{d}f}" if f and s else "n/a"
        base = [f"{b[labels]:.{d}f}" if labels in b else NOT_RUN for b in baselines.values()]
        rows.append([_size_text(labels, pipeline), _cell(f, d), _cell(s, d), margin])
        rows[-1] += [_holds(f, s), *base]
    return _table(header, rows)


def _fewshot(name: str, pipeline: dict, stats: dict) -> list[str]:
    """One line per number of demonstrations used by few-shot runs."""
    lines = []
    for (pipe, _, arm), stat in sorted(stats.items(), key=lambda kv: kv[0][2]):
        if pipe == name and arm.startswith("fewshot"):
            k = f", k={arm.split(':', 1)[1]} demonstrations" if ":" in arm else ""
            value = f"{pipeline['metric']} {_cell(stat, _digits(pipeline))}"
            lines.append(f"Few-shot (pre-trained model, no fine-tuning{k}): test {value}.")
    return lines


def _targets(name: str, pipeline: dict, stats: dict) -> list[str]:
    """The pre-trained-beats-scratch target and, when set, the target against a baseline."""
    d, parts, verdicts = _digits(pipeline), [], []
    for labels in _sizes(pipeline):
        if labels == pipeline.get("train_size"):
            continue
        f, s = (stats.get((name, labels, arm)) for arm in ARMS)
        verdicts.append(_holds(f, s))
        if f and s:
            spread = f"{f.std + s.std:.{d}f}"
            parts.append(f"{labels:,}: {f.mean - s.mean:+.{d}f} vs {spread} ({verdicts[-1]})")
        else:
            parts.append(f"{labels:,}: {NOT_RUN}")
    if not verdicts:
        status = "n/a (no size below all)"
    elif "no" in verdicts:
        status = "missed"
    elif "n/a" in verdicts:
        status = NOT_RUN
    else:
        status = "undecided (1 seed)" if "1 seed" in verdicts else "met"
    lines = [
        "- Pre-trained beats scratch by more than the seeds' spread (sum of the two stds) at "
        f"every labeled-set size except all: **{status}** ({'; '.join(parts)})."
    ]
    target = pipeline.get("target")
    if target and target.get("baseline"):  # the runner writes baseline None for none
        labels, baseline = target["labels"], target["baseline"]
        base = _baselines(pipeline).get(baseline, {}).get(labels)
        arms = [(stats[(name, labels, a)].mean, a) for a in ARMS if (name, labels, a) in stats]
        best = max(arms) if arms else None
        status = NOT_RUN if best is None or base is None else "met" if best[0] >= base else "missed"
        kiln = f"{ARMS[best[1]]} {best[0]:.{d}f}" if best else f"kiln arms {NOT_RUN}"
        base_text = f"{base:.{d}f}" if base is not None else NOT_RUN
        lines.append(
            f"- Best kiln arm at {_size_text(labels, pipeline)} labeled examples matches or beats "
            f"{baseline}: **{status}** ({kiln} vs {baseline} {base_text})."
        )
    return lines


def _pretrain_table(pipeline: dict) -> list[str]:
    header = ["seed", "minutes", "steps", "final train loss", "final validation loss"]
    done = {p["seed"]: p for p in pipeline.get("pretrain", [])}
    rows = []
    for seed in sorted(set(pipeline["seeds"]) | set(done)):
        p = done.get(seed)
        if p is None:
            rows.append([str(seed), NOT_RUN, "", "", ""])
            continue
        last = lambda key: f"{p[key][-1]:.3f}" if p.get(key) else "n/a"  # noqa: B023
        steps = f"{p['steps'][-1]:,}" if p.get("steps") else "n/a"
        rows.append(
            [str(seed), f"{p['minutes']:.1f}", steps, last("loss"), last("validation_loss")]
        )
    return _table(header, rows)


def _has_labels_plot(name: str, pipeline: dict, stats: dict) -> bool:
    return any((name, labels, arm) in stats for labels in _sizes(pipeline) for arm in ARMS)


def _has_pretrain_plot(pipeline: dict) -> bool:
    return any(p.get("loss") for p in pipeline.get("pretrain", []))


def render(results: dict) -> str:
    """The whole markdown document (deterministic: a function of `results` only)."""
    stats = summarize(results)
    lines = [
        "# Reproduction: pre-training then fine-tuning vs training from scratch",
        "",
        f"Size `{results['size']}`, run with `{results['command']}` on {results['machine']}; "
        f"updated {results['updated']}. For each pipeline a model is pre-trained on unlabeled "
        "text once per seed, then fine-tuned on a labeled set (*fine-tuned*) and compared with "
        "the same architecture trained on the same labeled set from a random initialization "
        "(*scratch*). Each arm's learning rate was chosen on the validation value of the primary "
        "metric only, with the same search for both arms; tables show the test metric as mean "
        "± sample std over seeds (n seeds). *Margin* is fine-tuned minus scratch; *holds* is yes "
        "when the margin exceeds the sum of the two stds with at least 2 seeds per arm. "
        "Baseline columns are non-neural models fitted on the same labeled set. Cells marked "
        f'"{NOT_RUN}" are missing from the results.',
    ]
    for name, p in results["pipelines"].items():
        lines += ["", f"## {name}", ""]
        lines += [
            f"Task `{p['task']}`, test {p['metric']} on {p['test_examples']:,} examples; "
            f"seeds {', '.join(map(str, p['seeds']))}.",
            "",
        ]
        lines += _results_table(name, p, stats)
        fewshot = _fewshot(name, p, stats)
        lines += ["", *fewshot] if fewshot else []
        lines += ["", "Targets:", "", *_targets(name, p, stats)]
        lines += ["", "Pre-training:", "", *_pretrain_table(p)]
        if p.get("notes"):  # Facts measured outside the grid (probes), each with its command.
            lines += ["", "Notes:", "", *(f"- {note}" for note in p["notes"])]
        if _has_labels_plot(name, p, stats):
            lines += ["", f"![{name}: test {p['metric']}]({PLOTS}/{name}_labels.png)"]
        if _has_pretrain_plot(p):
            lines += ["", f"![{name}: pre-training loss]({PLOTS}/{name}_pretrain.png)"]
    return "\n".join(lines) + "\n"


def _plot_labels(name: str, pipeline: dict, stats: dict, path: str) -> None:
    """Test metric against labeled examples (log x): arms with std error bars, baselines
    dashed, few-shot dotted."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = _sizes(pipeline)
    for arm, label in ARMS.items():
        points = [(x, stats[(name, x, arm)]) for x in sizes if (name, x, arm) in stats]
        if points:
            xs, ys, errs = zip(*[(x, s.mean, s.std) for x, s in points])
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
    for bname, by_labels in _baselines(pipeline).items():
        points = sorted(by_labels.items())
        positive = [(x, y) for x, y in points if x > 0]  # a log axis
        if len(positive) >= 2:
            ax.plot(*zip(*positive), ls="--", marker=".", label=bname)
        else:  # one labeled-set size: a horizontal line at its value
            x, y = (positive or points)[-1]
            ax.axhline(y, ls="--", lw=1, color="gray", label=f"{bname} ({x:,})")
    for (pipe, _, arm), stat in sorted(stats.items(), key=lambda kv: kv[0][2]):
        if pipe == name and arm.startswith("fewshot"):
            k = f" (k={arm.split(':', 1)[1]})" if ":" in arm else ""
            ax.axhline(stat.mean, ls=":", color="black", label=f"few-shot{k}")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{x:,}" for x in sizes])
    ax.minorticks_off()
    ax.set(xlabel="labeled training examples", ylabel=f"test {pipeline['metric']}", title=name)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pretrain(name: str, pipeline: dict, path: str) -> None:
    """Pre-training loss against step: train solid, validation dashed, one color per seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(sorted(pipeline.get("pretrain", []), key=lambda p: p["seed"])):
        ax.plot(p["steps"], p["loss"], color=f"C{i}", label=f"seed {p['seed']} train")
        if p.get("validation_loss"):
            ax.plot(
                p["validation_steps"],
                p["validation_loss"],
                color=f"C{i}",
                ls="--",
                marker=".",
                label=f"seed {p['seed']} validation",
            )
    ax.set(xlabel="step", ylabel="loss", title=f"{name}: pre-training")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(results: dict, plots_dir: str) -> list[str]:
    """Writes `<pipeline>_labels.png` and `<pipeline>_pretrain.png` (where there is data to
    draw) under plots_dir; returns the paths written."""
    os.makedirs(plots_dir, exist_ok=True)
    stats, written = summarize(results), []
    for name, p in results["pipelines"].items():
        if _has_labels_plot(name, p, stats):
            written.append(os.path.join(plots_dir, f"{name}_labels.png"))
            _plot_labels(name, p, stats, written[-1])
        if _has_pretrain_plot(p):
            written.append(os.path.join(plots_dir, f"{name}_pretrain.png"))
            _plot_pretrain(name, p, written[-1])
    return written


def write(results: dict, doc_path: str) -> None:
    """Writes doc_path (`render`, atomically) and the plots in `<its folder>/reproduction/`."""
    plot(results, os.path.join(os.path.dirname(os.path.abspath(doc_path)), PLOTS))
    tmp = f"{doc_path}.tmp"
    with open(tmp, "w") as f:
        f.write(render(results))
    os.replace(tmp, doc_path)
