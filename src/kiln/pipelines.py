"""Pipelines: several runs in order (pre-train -> fine-tune, scratch baseline), then a comparison.

A pipeline config has `stages`, a tuple of names, and one full run config per name. A stage's
`init_from.workdir` or `tokenizer.path` may be `@<earlier stage>`. Stage `s` runs in
`<workdir>/<s>/`; a stage whose summary.json reached its `train.steps` is skipped, an
interrupted one resumes from its own checkpoint. Stages named `<arm>_<variant>` (e.g.
`finetune_lr3e4`) form an arm: the comparison picks each arm's variant with the best
validation `select` metric and reports its test metrics, so both arms are tuned alike.

A stage with a `prompting` section (`arms.fewshot_stage`, e.g. the `fewshot` arm) trains
nothing (`train.steps=0`): it scores its `init_from` run on its task by zero- or k-shot prompting
(`kiln.prompting`, run by `kiln.evaluation.run_stage`), and its metrics join the comparison.
"""

import json
import os
from typing import Any

import ml_collections

from kiln import metrics, seeds, validation
from kiln import workdir as workdir_lib
from kiln.errors import KilnError

COMPARISON = "comparison"


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
    return "stages" in config


def is_prompting(stage: ml_collections.ConfigDict) -> bool:
    """Whether a stage evaluates by prompting instead of training (a `prompting` section)."""
    return "prompting" in stage


def _check_prompting(stage: ml_collections.ConfigDict) -> None:
    """A prompting stage's rules: no training, a task, a run to start from, valid options."""
    from kiln import prompting

    if stage.train.steps != 0:
        raise KilnError(
            f"train.steps={stage.train.steps}: a stage with a prompting section trains nothing;"
            " set train.steps=0 (arms.fewshot_stage does), or drop the prompting section."
        )
    if not stage.task.name or not stage.init_from.workdir:
        raise KilnError(
            "a prompting stage needs task.name and init_from.workdir (the run it prompts, e.g."
            " '@pretrain'); set both."
        )
    prompting.Options(**stage.prompting.to_dict())


def _resolve(value: str, workdir: str, stages: list[str], done: list[str], key: str) -> str:
    """`@stage` -> that stage's workdir (it must come earlier in the pipeline)."""
    if not value.startswith("@"):
        return value
    name = value[1:]
    if name not in stages:
        raise KilnError(f"{key}={value!r} names no stage; stages are {stages}.")
    if name not in done:
        raise KilnError(f"{key}={value!r} names a stage that runs later; reorder `stages`.")
    return os.path.join(workdir, name)


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every unfinished stage in order, then writes comparison.md and comparison.json."""
    import jax

    from kiln import (
        run,  # Imports jax: keep config-only users of this module light.
    )

    stages = list(config.stages)
    for name in stages:  # Check every stage before the first one starts.
        if name not in config:
            raise KilnError(f"pipeline stage {name!r} has no config section; add config.{name}.")
        try:
            if is_prompting(config[name]):
                _check_prompting(config[name])
            else:
                validation.validate(config[name], jax.device_count(), jax.process_count())
        except KilnError as e:
            raise KilnError(f"pipeline stage {name!r}: {e}") from e
    done: list[str] = []
    for name in stages:
        stage = config[name]
        stage_dir = os.path.join(workdir, name)
        stage.init_from.workdir = _resolve(
            stage.init_from.workdir, workdir, stages, done, f"{name}.init_from.workdir"
        )
        stage.tokenizer.path = _resolve(
            stage.tokenizer.path, workdir, stages, done, f"{name}.tokenizer.path"
        )
        if workdir_lib.run_finished(stage_dir, stage.train.steps):
            metrics.log(f"Pipeline: stage {name} already finished in {stage_dir}; skipped")
        else:
            metrics.log(f"Pipeline: stage {name} -> {stage_dir}")
            summary = run.train_and_evaluate(stage, stage_dir)  # Routes prompting stages.
            stopped_early = summary.get("early_stopped")  # train.early_stop_patience: finished
            if summary.get("step") != stage.train.steps and not stopped_early:  # stop_after
                metrics.log(f"Pipeline: stopped in stage {name}; re-run to continue")
                return summary
        done.append(name)
    table = comparison(config, workdir)
    if jax.process_index() == 0:
        write_comparison(table, workdir)
    return table


def _summary(workdir: str, name: str) -> dict[str, Any]:
    summary = workdir_lib.read_summary(os.path.join(workdir, name))
    if summary is None:
        raise KilnError(f"Pipeline stage {name!r} has no {workdir_lib.SUMMARY} in {workdir}.")
    return summary


def _source_name(init_from: ml_collections.ConfigDict) -> str:
    """What a stage starts from, for the comparison: its init_from run or HF directory."""
    source = init_from.workdir or init_from.get("hf", "")
    return os.path.basename(os.path.normpath(source)) if source else "scratch"


def comparison(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Each stage's validation and test metrics, and each arm's variant chosen on validation."""
    select = config.get("select", "")
    rows = {}
    for name in config.stages:
        summary = _summary(workdir, name)
        stage = config[name]
        rows[name] = {
            "task": stage.task.name or "pre-training",
            "init_from": _source_name(stage.init_from)
            + (f", {summary['method']}" if "method" in summary else ""),
            "steps": summary["step"],
            "metrics": {k: v for k, v in summary.items() if k.startswith(("validation/", "test/"))},
        }
    arms = _choose_arms(rows, select) if select else {}
    table = {"select": select, "stages": rows, "arms": arms}
    table["verdict"] = verdict(table, config.get("advice", ""))
    return table


def _choose_arms(rows: dict[str, Any], select: str) -> dict[str, Any]:
    """Each arm's variant with the best validation `select` (the mean over its seed
    replicates `<variant>_seed<N>`), with its metrics: a single stage's, or the means over the
    replicates plus their sample std ("std"), count ("n") and stage names ("stages")."""
    key = f"validation/{select}"
    variants: dict[str, list[str]] = {}
    for name, row in rows.items():
        if row["task"] != "pre-training" and key in row["metrics"]:
            variants.setdefault(seeds.split_name(name)[0], []).append(name)
    arms: dict[str, Any] = {}
    for variant, members in variants.items():
        if len(members) == 1:
            entry = {"stage": members[0], "metrics": rows[members[0]]["metrics"]}
        else:
            stats = seeds.aggregate([rows[m]["metrics"] for m in members])
            entry = {
                "stage": variant,
                "metrics": {k: s.mean for k, s in stats.items()},
                "std": {k: s.std for k, s in stats.items()},
                "n": len(members),
                "stages": members,
            }
        arm = variant.split("_")[0]
        best = arms.get(arm)
        if best is None or entry["metrics"][key] > best["metrics"][key]:
            arms[arm] = entry
    return arms


def verdict(table: dict[str, Any], advice: str) -> str:
    """One sentence: did the pre-trained arm beat scratch on the test `select` metric? Then
    `advice` (what the result does not show, and where to look further)."""
    arms, select = table["arms"], table["select"]
    if not {"finetune", "scratch"} <= set(arms):
        return ""
    key = f"test/{select}"
    ours, theirs = arms["finetune"]["metrics"].get(key), arms["scratch"]["metrics"].get(key)
    if ours is None or theirs is None:
        return ""
    n = (arms["finetune"].get("n", 1), arms["scratch"].get("n", 1))
    if max(n) > 1:
        select = f"{select} (means over {n[0]} and {n[1]} seeds)"
    if ours > theirs:
        return (
            f"Pre-training helped: test {select} {ours:.4g} fine-tuned from the pre-trained"
            f" checkpoint vs {theirs:.4g} from scratch ({ours - theirs:+.4g}). {advice}".strip()
        )
    return (
        f"Pre-training did not help at this budget: test {select} {ours:.4g} fine-tuned from the"
        f" pre-trained checkpoint vs {theirs:.4g} from scratch. {advice}".strip()
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(table: dict[str, Any]) -> str:
    """The comparison as markdown: fine-tuning stages side by side, then pre-training stages."""
    rows = table["stages"]
    tuned = {n: r for n, r in rows.items() if r["task"] != "pre-training"}
    lines = []
    if tuned:
        names = sorted(
            {k.split("/", 1)[1] for r in tuned.values() for k in r["metrics"]} - _HIDDEN,
            key=lambda m: (m != table["select"], *_metric_order(m)),
        )
        head = ["stage", "init_from", "steps"] + [f"test {m}" for m in names]
        head += [f"validation {m}" for m in names if m in _HEADLINE]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in tuned.items():
            m = r["metrics"]
            cells = [name, r["init_from"], str(r["steps"])]
            cells += [_fmt(m.get(f"test/{k}")) for k in names]
            cells += [_fmt(m.get(f"validation/{k}")) for k in names if k in _HEADLINE]
            lines.append("| " + " | ".join(cells) + " |")
    if table["arms"]:
        lines += ["", f"Chosen on validation {table['select']} (test metrics of the chosen stage):"]
        for arm, chosen in table["arms"].items():
            m, std = chosen["metrics"], chosen.get("std", {})
            shown = ", ".join(
                f"{k.split('/', 1)[1]} {_fmt(v)}"
                + (f" ± {std[k]:.2g}" if std.get(k) is not None else "")
                for k, v in m.items()
                if k.startswith("test/") and k.split("/", 1)[1] in _HEADLINE
            )
            over = f" (mean ± sample std over {chosen['n']} seeds)" if "n" in chosen else ""
            lines.append(f"- {arm} arm -> stage {chosen['stage']}{over}: {shown}")
    lines += _seed_lines(table)
    if table.get("verdict"):
        lines += ["", table["verdict"]]
    pre = {n: r for n, r in rows.items() if r["task"] == "pre-training"}
    for name, r in pre.items():
        m = r["metrics"]
        lines += [
            "",
            f"Pre-training stage {name} ({r['steps']} steps): test loss"
            f" {_fmt(m.get('test/loss'))}, perplexity {_fmt(m.get('test/perplexity'))},"
            f" token accuracy {_fmt(m.get('test/accuracy'))}",
        ]
    return "\n".join(lines) + "\n"


def _seed_lines(table: dict[str, Any]) -> list[str]:
    """Mean ± sample std of the headline test metrics per group of seed replicates."""
    rows = {n: r for n, r in table["stages"].items() if r["task"] != "pre-training"}
    groups = seeds.group((name, {}) for name in rows)
    if not seeds.has_replicates(groups):
        return []
    keys = [
        f"test/{m}"
        for m in sorted({k.split("/", 1)[1] for r in rows.values() for k in r["metrics"]})
        if m in _HEADLINE
    ]
    summaries = {name: r["metrics"] for name, r in rows.items()}
    return [
        "",
        "Over seeds (mean ± sample std, n - 1; n = seeds):",
        "",
        seeds.table(groups, summaries, keys).rstrip(),
    ]


_HEADLINE = ("accuracy", "macro_f1", "exact_match", "bleu", "chrf", "rouge_l")
_HIDDEN = {"tokens", "examples", "perplexity", "token_accuracy", "prompt_shots", "prompts_cut"}


def _metric_order(name: str) -> tuple[int, str]:
    return (_HEADLINE.index(name) if name in _HEADLINE else len(_HEADLINE), name)


def write_comparison(table: dict[str, Any], workdir: str) -> None:
    with open(os.path.join(workdir, f"{COMPARISON}.json"), "w") as f:
        json.dump(table, f, indent=2)
    text = markdown(table)
    with open(os.path.join(workdir, f"{COMPARISON}.md"), "w") as f:
        f.write(text)
    metrics.log(f"Pipeline comparison ({os.path.join(workdir, COMPARISON)}.md):\n{text}")
