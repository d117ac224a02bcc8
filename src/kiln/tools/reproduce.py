"""`make reproduce`: the project's claim measured for every family. Pre-training on unlabeled
text, then fine-tuning on a small labeled set, against the same fine-tuning from scratch, at
several labeled-set sizes and seeds, next to non-neural baselines.

  python -m kiln.tools.reproduce --size cpu --workdir runs/reproduce \
      [--pipelines bert_wn_lexname,t5_kjv2web,gpt_code_summary] [--labels 1000,5000,all] \
      [--seeds 0,1,2] [--results docs/reproduction.json]

For each pipeline (`experiments/pipelines/<name>.py`) and seed: pre-training once
(`<workdir>/<name>/seed<S>/pretrain`), the few-shot arm once where the family generates, then per
labeled-set size a cell (`.../n<N>/`): the pipeline's `finetune` and `scratch` arms, each
learning rate chosen on validation only. Each finished cell is written to the results JSON at
once and the document (`--results` with `.md`, and its plots) is rendered again, so a run
stopped at any point keeps what it measured; re-running skips the cells the JSON holds for the
same config and resumes an interrupted cell from its checkpoints. The baselines
(`kiln.tools.baselines`) are scored once per labeled-set size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import ml_collections

from kiln.errors import KilnError
from kiln.tools import cli, host_memory
from kiln.tools.study import Study, pretrain_curve

PROG = "kiln.tools.reproduce"


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the study runs of one pipeline: its baselines, its few-shot arm (demonstrations;
    None: the family does not generate) and the issue's target (a baseline the best arm must
    reach at `target_labels` examples; 0 = the whole train split)."""

    baselines: tuple[str, ...]
    shots: int | None
    target: str
    target_labels: int


PIPELINES = {
    "bert_wn_lexname": Spec(("majority", "tfidf_svm"), None, "tfidf_svm", 5_000),
    "t5_kjv2web": Spec(("copy_input",), 1, "copy_input", 0),
    "gpt_code_summary": Spec(("tfidf_retrieval",), 1, "tfidf_retrieval", 0),
}


class Stopped(Exception):
    """A run ended before its last step (train.stop_after): the study stops, to be re-run."""


def cell_config(
    experiments: str, name: str, size: str, seed: int, labels: str, shots: int | None
) -> ml_collections.ConfigDict:
    """The pipeline config of one (seed, labeled-set size); `labels` is a number or "all"."""
    from kiln import config_lib

    arg = f"size={size},seed={seed},labels={labels}"
    if shots is not None:
        arg += f",fewshot={shots}"
    return config_lib.load_config(os.path.join(experiments, f"{name}.py:{arg}"))


def fingerprint(*configs: ml_collections.ConfigDict) -> str:
    """A short hash of run configs (a cell's stages and its pre-training; not the pipeline's
    wording): a cell measured under other configs is redone."""
    text = json.dumps([c.to_dict() for c in configs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _pointing_at(stage: ml_collections.ConfigDict, pretrain_dir: str) -> ml_collections.ConfigDict:
    """A copy of `stage` whose `@pretrain` references name `pretrain_dir`."""
    stage = ml_collections.ConfigDict(stage.to_dict())
    if stage.init_from.workdir == "@pretrain":
        stage.init_from.workdir = pretrain_dir
    if stage.tokenizer.path == "@pretrain":
        stage.tokenizer.path = pretrain_dir
    return stage


def arms_pipeline(
    config: ml_collections.ConfigDict, pretrain_dir: str
) -> ml_collections.ConfigDict:
    """The cell's pipeline: the `finetune` and `scratch` stages of `config`, starting from the
    seed's shared pre-training run instead of a `pretrain` stage of their own."""
    from kiln import arms, pipelines

    stages = {
        name: _pointing_at(config[name], pretrain_dir)
        for name in config.stages
        if name != "pretrain" and not pipelines.is_prompting(config[name])
    }
    return arms.pipeline(stages, select=config.select, advice=config.advice)


def _run_stage(stage: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """One run (training, or a prompting stage), skipped if its summary says it finished."""
    from kiln import run
    from kiln import workdir as workdir_lib

    if not workdir_lib.run_finished(workdir, stage.train.steps):
        run.train_and_evaluate(stage, workdir)
    summary = workdir_lib.read_summary(workdir)
    if summary is None or summary.get("step") != stage.train.steps:
        raise Stopped(workdir)
    return summary


def _minutes(summary: dict[str, Any]) -> float:
    return round(summary.get("train_seconds_this_session", 0.0) / 60, 2)


@dataclasses.dataclass(frozen=True)
class Grid:
    """What one `reproduce` command runs."""

    experiments: str  # the folder of the pipeline files
    workdir: str
    size: str
    pipelines: tuple[str, ...]
    labels: tuple[str, ...]  # numbers, or "all"
    seeds: tuple[int, ...]


def run_pipeline_study(grid: Grid, name: str, study: Study) -> None:
    """Baselines, then per seed: pre-training, the few-shot arm, and one cell per labels size."""
    from kiln import pipelines

    spec = PIPELINES[name]
    task = None  # loaded once, for the first cell
    for seed in grid.seeds:
        seed_dir = os.path.join(grid.workdir, name, f"seed{seed}")
        pretrain_dir = os.path.join(seed_dir, "pretrain")
        pretrained = False
        for labels in grid.labels:
            config = cell_config(grid.experiments, name, grid.size, seed, labels, spec.shots)
            cell = arms_pipeline(config, "@pretrain")
            if task is None:  # Facts of the task, not of a labeled set or seed.
                task = _describe(study, name, spec, config, cell, grid)
            if seed == grid.seeds[0]:  # Facts of the labeled set, not of a seed.
                _baselines(study, name, spec, cell, task)
            count = _train_examples(cell)
            cell_print = fingerprint(*(cell[s] for s in cell.stages), config.pretrain)
            if study.has_cell(name, seed, count, {"finetune", "scratch"}, cell_print):
                continue
            if not pretrained:  # Once per seed, for the first cell that needs it.
                _pretrain(study, name, seed, config, pretrain_dir)
                _fewshot(study, name, seed, config, pretrain_dir, os.path.join(seed_dir, "fewshot"))
                pretrained = True
            started = time.perf_counter()
            table = pipelines.run_pipeline(
                arms_pipeline(config, pretrain_dir), os.path.join(seed_dir, f"n{count}")
            )
            if "arms" not in table:
                raise Stopped(seed_dir)
            minutes = round((time.perf_counter() - started) / 60, 2)
            for arm in ("finetune", "scratch"):
                chosen = table["arms"][arm]
                study.put(
                    "runs",
                    name,
                    {
                        "seed": seed,
                        "labels": count,
                        "arm": arm,
                        "stage": chosen["stage"],
                        "validation": chosen["metrics"][f"validation/{cell.select}"],
                        "test": chosen["metrics"][f"test/{cell.select}"],
                        "minutes": minutes,  # the whole cell: both arms, every learning rate
                        "fingerprint": cell_print,
                    },
                    ("seed", "labels", "arm"),
                )
            study.save()
            metrics_log(f"{name} seed {seed}, {count} labels: {table['verdict']}")


def _train_examples(pipeline: ml_collections.ConfigDict) -> int:
    counts = {pipeline[s].task.train_examples for s in pipeline.stages}
    assert len(counts) == 1, counts  # Both arms train on the same labeled set.
    return counts.pop()


def _data_dir(config: ml_collections.ConfigDict) -> str | None:
    return config.pretrain.data.data_dir or None


def _describe(
    study: Study,
    name: str,
    spec: Spec,
    config: ml_collections.ConfigDict,
    cell: ml_collections.ConfigDict,
    grid: Grid,
) -> Any:
    """The pipeline's fixed facts (task, metric and its scale, split sizes, the grid asked);
    returns the loaded task."""
    from kiln import evaluation
    from kiln.data import tasks

    first = cell[cell.stages[0]]
    task = tasks.load_task(first.task.name, data_dir=_data_dir(config))
    train_size = len(task.splits["train"])
    entry = study.entry(name)
    labels = {train_size if x == "all" else int(x) for x in grid.labels}
    entry.update(
        task=task.name,
        metric=cell.select,
        scale=1.0 if task.kind == "classification" else 100.0,
        train_size=train_size,
        test_examples=len(evaluation.examples_of(task, "test", first.task.eval_examples)),
        labels=sorted(labels | set(entry.get("labels", ()))),
        seeds=sorted(set(grid.seeds) | set(entry.get("seeds", ()))),
        target={"baseline": spec.target, "labels": spec.target_labels or train_size},
    )
    return task


def _baselines(
    study: Study, name: str, spec: Spec, cell: ml_collections.ConfigDict, task: Any
) -> None:
    """The spec's baselines on this cell's labeled set of `task`, each scored once."""
    from kiln.tools import baselines

    first = cell[cell.stages[0]]
    count = _train_examples(cell)
    done = {(b["name"], b["labels"]) for b in study.entry(name)["baselines"]}
    for baseline in spec.baselines:
        if (baseline, count) in done:
            continue
        scores = baselines.score(baseline, task, count, first.task.eval_examples)
        study.put(
            "baselines",
            name,
            {
                "name": baseline,
                "labels": scores["labels"],
                "choice": scores["choice"],
                "validation": scores["validation"][cell.select],
                "test": scores["test"][cell.select],
            },
            ("name", "labels"),
        )
        study.save()


def _pretrain(
    study: Study, name: str, seed: int, config: ml_collections.ConfigDict, workdir: str
) -> None:
    """The seed's pre-training run (shared by its cells) and its loss curve in the JSON."""
    summary = _run_stage(config.pretrain, workdir)
    row = {"seed": seed, "minutes": _minutes(summary), **pretrain_curve(workdir)}
    study.put("pretrain", name, row, ("seed",))


def _fewshot(
    study: Study,
    name: str,
    seed: int,
    config: ml_collections.ConfigDict,
    pretrain_dir: str,
    workdir: str,
) -> None:
    """The few-shot arm (no labeled training): the seed's pre-trained model prompted."""
    from kiln import pipelines

    stages = [s for s in config.stages if pipelines.is_prompting(config[s])]
    if not stages:
        return
    stage = _pointing_at(config[stages[0]], pretrain_dir)
    summary = _run_stage(stage, workdir)
    study.put(
        "runs",
        name,
        {
            "seed": seed,
            "labels": 0,
            "arm": "fewshot",
            "shots": stage.prompting.shots,
            "validation": summary[f"validation/{config.select}"],
            "test": summary[f"test/{config.select}"],
            "fingerprint": fingerprint(config[stages[0]], config.pretrain),
        },
        ("seed", "labels", "arm"),
    )


def metrics_log(text: str) -> None:
    from kiln import metrics

    metrics.log(f"Reproduce: {text}")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_grid(argv: list[str]) -> tuple[Grid, str]:
    """The command line -> (the grid, the results JSON path); bad values are KilnErrors."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="cpu", help="the pipelines' size (tiny, cpu, gpu)")
    parser.add_argument("--workdir", default="runs/reproduce", help="where the runs go")
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--labels", default="1000,5000,all", help="labeled-set sizes")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", default="docs/reproduction.json", help="the JSON (and .md)")
    parser.add_argument("--experiments", default="experiments/pipelines")
    args = parser.parse_args(argv)
    unknown = [p for p in _csv(args.pipelines) if p not in PIPELINES]
    if unknown or not _csv(args.pipelines):
        raise KilnError(f"--pipelines={args.pipelines!r}: choose from {', '.join(PIPELINES)}.")
    labels = _csv(args.labels)
    if not labels or any(x != "all" and not (x.isdigit() and int(x) > 0) for x in labels):
        raise KilnError(f"--labels={args.labels!r}: give sizes like 1000,5000,all.")
    seeds = _csv(args.seeds)
    if not seeds or any(not x.isdigit() for x in seeds) or len(set(seeds)) != len(seeds):
        raise KilnError(f"--seeds={args.seeds!r}: give distinct seeds like 0,1,2.")
    if not args.results.endswith(".json"):
        raise KilnError(f"--results={args.results!r}: give a .json path (the .md goes beside).")
    grid = Grid(
        experiments=args.experiments,
        workdir=args.workdir,
        size=args.size,
        pipelines=_csv(args.pipelines),
        labels=labels,
        seeds=tuple(int(x) for x in seeds),
    )
    return grid, args.results


def main(argv: list[str] | None = None) -> int:
    """Runs the study the command line asks for; exit code 0 when every cell is done."""
    argv = sys.argv[1:] if argv is None else argv

    def body() -> int:
        grid, results = parse_grid(argv)
        study = Study(results, grid.size, "python -m kiln.tools.reproduce " + " ".join(argv))
        try:
            for name in grid.pipelines:
                run_pipeline_study(grid, name, study)
        except Stopped as e:
            print(f"{PROG}: a run stopped early in {e}; re-run the same command to go on.")
            return 3
        study.save()
        print(f"{PROG}: done; the document is {os.path.splitext(results)[0]}.md")
        return 0

    return cli.run(PROG, body)


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # Process-wide, so here and not on import: before JAX starts.
    sys.exit(main())
