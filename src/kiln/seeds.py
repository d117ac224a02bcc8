"""Runs repeated over seeds: their names and mean +- sample std of their metrics.

A pipeline stage repeated over seeds is named `<stage>_seed<N>` (`stage_name`; e.g.
`finetune_seed0`, `finetune_lr1e-3_seed1`, built by `arms.finetune_arms(..., seeds=...)`); a
sweep point repeated over seeds differs from its twins only in its `seed` override. Both group
into one `Group` per set of seed replicates; `aggregate` gives each numeric metric's mean, its
sample standard deviation (n - 1 in the denominator; None when n = 1) and n. Pure Python: the
comparison (`kiln.pipelines`) and `kiln.tools.report` use it without JAX.
"""

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

_SUFFIX = re.compile(r"_seed(\d+)$")


def stage_name(base: str, seed: int) -> str:
    """`base` for one seed replicate: `finetune` -> `finetune_seed1`."""
    return f"{base}_seed{seed}"


def split_name(name: str) -> tuple[str, int | None]:
    """(`name` without its `_seed<N>` suffix, N), or (`name`, None) if it has none."""
    match = _SUFFIX.search(name)
    if match is None:
        return name, None
    return name[: match.start()], int(match.group(1))


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (None for n = 1) of n finite values."""

    mean: float
    std: float | None
    n: int

    def text(self) -> str:
        """`0.5213 ± 0.0031` (`0.5213` when n = 1): 4 significant digits, the std 2."""
        if self.std is None:
            return f"{self.mean:.4g}"
        return f"{self.mean:.4g} ± {self.std:.2g}"


def stat(values: Sequence[float]) -> Stat:
    """Mean and sample std (Bessel-corrected) of `values` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("stat() needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Stat(mean, None, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return Stat(mean, math.sqrt(variance), n)


def aggregate(summaries: Sequence[dict[str, Any]]) -> dict[str, Stat]:
    """Per key, the `Stat` of the finite numeric values the `summaries` hold for it (a key that
    some summaries lack is aggregated over those that have it; its `n` says how many)."""
    values: dict[str, list[float]] = {}
    for summary in summaries:
        for key, value in summary.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            if numeric and math.isfinite(value):
                values.setdefault(key, []).append(float(value))
    return {key: stat(vs) for key, vs in values.items()}


@dataclasses.dataclass
class Group:
    """Seed replicates of one run: its name, the members' names and the seeds."""

    name: str
    members: list[str]
    seeds: list[Any]


def group(runs: Iterable[tuple[str, dict[str, Any]]]) -> list[Group]:
    """Seed replicates among `runs` ((name, overrides) pairs, in order): runs whose overrides
    differ only in `seed` (a sweep), or whose names differ only in a `_seed<N>` suffix (a
    pipeline). Groups keep the order of their first member; a run without twins is a group of
    one."""
    groups: dict[str, Group] = {}
    for name, overrides in runs:
        if "seed" in overrides:
            rest = {k: v for k, v in overrides.items() if k != "seed"}
            key = "sweep:" + repr(sorted(rest.items(), key=lambda kv: kv[0]))
            label = ", ".join(f"{k}={v}" for k, v in rest.items()) or "all"
            seed = overrides["seed"]
        else:
            label, seed = split_name(name)
            key = "name:" + label
        entry = groups.setdefault(key, Group(label, [], []))
        entry.members.append(name)
        entry.seeds.append(seed)
    return list(groups.values())


def has_replicates(groups: Sequence[Group]) -> bool:
    return any(len(g.members) > 1 for g in groups)


def table(
    groups: Sequence[Group], summaries: dict[str, dict[str, Any]], keys: Sequence[str]
) -> str:
    """A markdown table: one row per group with at least one finished member, `keys` as
    `mean ± std` over its finished members' summaries, and n."""
    head = ["runs", "n", *keys]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        done = [summaries[m] for m in g.members if summaries.get(m) is not None]
        if not done:
            continue
        stats = aggregate(done)
        cells = [g.name, str(len(done))]
        cells += [stats[k].text() if k in stats else "" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_section(
    runs: Sequence[tuple[str, dict[str, Any], dict | None]], keys: Sequence[str]
) -> str:
    """`kiln.tools.report`'s markdown section for seed replicates, from (name, overrides,
    summary or None) per run; "" when no run has a twin."""
    groups = group((name, overrides) for name, overrides, _ in runs)
    if not has_replicates(groups):
        return ""
    summaries = {name: summary for name, _, summary in runs}
    return (
        "\n## Over seeds\n\nMean ± sample standard deviation (n - 1 in the denominator) over"
        " each run's seed replicates; n = finished replicates.\n\n" + table(groups, summaries, keys)
    )
