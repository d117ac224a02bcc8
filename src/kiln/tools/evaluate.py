"""Score a finished run, or an imported Hugging Face model, on a labeled task without training.

  python -m kiln.tools.evaluate --workdir runs/ft --task wn_lexname
  python -m kiln.tools.evaluate --workdir runs/gpt --task bible_genre --shots 4 --scoring rank
  python -m kiln.tools.evaluate --workdir runs/t5 --task mine.jsonl --split validation \
      --examples 200 --out preds.jsonl

`--workdir` is a run (its latest checkpoint, or `--step`) or the output of `kiln.tools.convert
--from-hf`. A run fine-tuned with a head (bert, gpt classification/regression) answers its own
task with that head; a run fine-tuned to answer in text (t5, gpt generation) answers its own
task as it was trained, unless `--shots` or `--scoring` ask for prompting; every other case (a
pre-trained-only or imported model, another task) is scored by prompting (`kiln.prompting`):
k demonstrations from the task's train split, then generation with the task metrics or
log-likelihood ranking of the label words. `--task` is a shipped task or a JSONL file
(`kiln.data.tasks.load_task`). Prints the metrics and writes one JSON line per example to `--out`
(default `<workdir>/evaluation_<task>_<split>.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kiln import checkpoint, config_lib, defaults, finetuning, models, prompting, restore, sharding
from kiln import workdir as workdir_lib
from kiln.data import finetune, tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.tools import cli

SPLITS = ("train", "validation", "test")


def task_section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The `task` section scoring `name` (a task or a .jsonl path): the run's own when it is the
    same task, else the defaults'."""
    base = defaults.run_sections(seq_len=1, batch=1, steps=1, lr=0.0, objective="").task
    own = config.get("task")
    is_path = name.endswith(".jsonl") or os.sep in name
    same = own is not None and own.get("name") == name and not is_path
    section = ml_collections.ConfigDict(own.to_dict() if same else base.to_dict())
    if is_path:
        section.name, section.path = "jsonl", os.path.abspath(os.path.expanduser(name))
    else:
        section.name = name
    return section


def restore_model(
    source: restore.Source, num_classes: int, mesh: jax.sharding.Mesh
) -> tuple[nn.Module, Any]:
    """(model, per-layer parameters) of `source`, with its head when `num_classes` > 0; the
    model unscanned, as checkpoints hold per-layer blocks."""
    model_cfg = ml_collections.ConfigDict(source.config.model.to_dict())
    model_cfg.scan_layers = False
    pooling = source.config.get("task", {}).get("pooling", "") if num_classes else ""
    model = models.build_model(model_cfg, num_classes, pooling)
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    shardings = sharding.tree_shardings(boxed, mesh)
    if source.params is not None:
        place = lambda a, s: jax.device_put(np.asarray(a), s)  # noqa: E731
        return model, jax.tree.map(place, source.params, shardings)
    abstract = checkpoint.abstract_like(nn.unbox(boxed), shardings)
    ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
    try:
        return model, ckpt.restore_params(source.step, abstract)
    finally:
        ckpt.close()


def head_outputs(
    model: nn.Module,
    params: Any,
    config: ml_collections.ConfigDict,
    task: tasks.Task,
    examples: list[tasks.Example],
    tok: tokenizer_lib.AnyTokenizer,
) -> list[int] | list[float]:
    """A head's argmax class (or regression value) for each example, batched as the run did."""
    layout = models.family(config.model.family).layout
    batches, _ = finetune.make_eval_batches(
        task,
        layout,
        tok,
        examples,
        seq_len=config.data.seq_len,
        target_len=config.task.target_len,
        template=finetuning.template(config.task, task),
        batch_size=config.data.global_batch_size,
    )
    keys = ("inputs", "segment_ids", "positions", "token_type_ids")
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    out: list = []
    for batch in batches:
        logits = np.asarray(forward(params, {k: v for k, v in batch.items() if k in keys}))
        out += logits[:, 0].tolist() if task.kind == "regression" else logits.argmax(-1).tolist()
    return out[: len(examples)]


def prompting_options(config: ml_collections.ConfigDict, **given: Any) -> prompting.Options:
    """`prompting.Options` from `given` (None = default); seq_len defaults to the model's
    max_len."""
    fields = {k: v for k, v in given.items() if v is not None}
    fields.setdefault("seq_len", int(config.model.max_len))
    return prompting.Options(**fields)


class Evaluator:
    """A restored run (or imported model) ready to score a task's examples; `method` says how:
    "head", "fine-tuned" (its trained text format) or "prompting"."""

    def __init__(
        self,
        source: restore.Source,
        task_cfg: ml_collections.ConfigDict,
        options: dict[str, Any],
    ):
        config = source.config
        self.config, self.source = config, source
        self.task = finetuning.load(task_cfg, config.data.data_dir)
        family = models.family(config.model.family)
        own = config.get("task", {}).get("name", "")
        same = (
            own
            and config.task.get("path", "") == task_cfg.get("path", "")
            and (own == task_cfg.name)
        )
        asked = any(options.get(k) is not None for k in ("shots", "scoring"))
        if own and family.uses_head(self.task.kind) and config.task.get("name"):
            if not same:
                raise KilnError(
                    f"--workdir={source.workdir} fine-tuned a head on task {own!r}; its head"
                    f" cannot answer task {task_cfg.name!r}. Evaluate its pre-training run with"
                    " prompting, or fine-tune on that task."
                )
            if asked:
                raise KilnError(
                    f"--workdir={source.workdir} answers {own!r} with its head: --shots and"
                    " --scoring are for prompting a model that generates. Drop them."
                )
            self.method = "head"
        elif same and not asked:
            self.method = "fine-tuned"
        else:
            if not family.generates:
                raise KilnError(
                    f"--workdir={source.workdir} is a {family.name} model without a head for"
                    f" task {task_cfg.name!r}: prompting needs a gpt or t5 model. Fine-tune it"
                    " with a head first."
                )
            self.method = "prompting"
        self.options = prompting_options(config, **options)
        classes = finetuning.num_classes(family.name, self.task) if self.method == "head" else 0
        self.mesh = sharding.make_mesh(
            ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
        )
        self.model, self.params = restore_model(source, classes, self.mesh)
        self.tok = tokenizer_lib.load_tokenizer(source.tokenizer_path)

    def describe(self) -> str:
        """How it answers, in words."""
        if self.method != "prompting":
            return self.method
        o = self.options
        return f"prompting ({o.shots}-shot, {o.scoring}{', normalized' if o.normalize else ''})"

    def score(self, examples: list[tasks.Example]) -> tuple[dict[str, float], list[dict]]:
        """(task metrics, one row per example) of `examples`."""
        if not examples:
            raise KilnError(
                f"No examples to score for task {self.task.name!r}: the split is empty."
            )
        if self.method == "prompting":
            return prompting.score(
                self.model, self.params, self.task, examples, self.tok, self.options, self.mesh
            )
        classes = []
        if self.method == "head":
            classes = head_outputs(
                self.model, self.params, self.config, self.task, examples, self.tok
            )
        metrics, preds = finetuning.score(
            self._answering(),
            self.task,
            examples,
            self.model,
            self.params,
            self.tok,
            classes,
            self.mesh,
        )
        rows = [{"id": e.id, "prediction": p, "target": e.target} for e, p in zip(examples, preds)]
        return metrics, rows

    def _answering(self) -> finetuning.Answering:
        c = self.config
        return finetuning.Answering(
            family=c.model.family,
            seq_len=c.data.seq_len,
            batch_size=c.data.global_batch_size,
            template=finetuning.template(c.task, self.task),
            decode=config_lib.decode_options(c.decode, c.seed, c.task.target_len),
        )


def examples_of(task: tasks.Task, split: str, n: int) -> list[tasks.Example]:
    """A split's examples: the first `n` by md5 of the id (as a run's task.eval_examples), or
    all of them if `n` is 0."""
    if split not in task.splits:
        raise KilnError(f"--split={split!r} is not one of {', '.join(SPLITS)}.")
    return tasks.low_resource_subset(task.splits[split], n) if n > 0 else task.splits[split]


def run_stage(stage: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """A pipeline's prompting stage: `stage.init_from` (a workdir or HF-import run) scored on
    `stage.task` as `stage.prompting` says; writes summary.json (step 0, validation/ and test/
    metrics) and predictions_test.jsonl in `workdir`, and returns the summary."""
    init = ml_collections.ConfigDict({"workdir": stage.init_from.workdir, "step": -1})
    source = restore.resolve(init, f"{workdir}: init_from.")
    evaluator = Evaluator(source, stage.task, dict(stage.prompting.to_dict()))
    summary: dict[str, Any] = {
        "step": 0,
        "task": evaluator.task.name,
        "method": evaluator.describe(),
    }
    os.makedirs(workdir, exist_ok=True)
    for split in ("validation", "test"):
        examples = examples_of(evaluator.task, split, int(stage.task.eval_examples))
        metrics, rows = evaluator.score(examples)
        summary.update({f"{split}/{k}": v for k, v in metrics.items()})
        summary[f"{split}/examples"] = len(examples)
        if split == "test" and jax.process_index() == 0:
            path = os.path.join(workdir, workdir_lib.PREDICTIONS)
            cli.write_text(path, "".join(json.dumps(r) + "\n" for r in rows), "")
    workdir_lib.write_summary(workdir, summary)
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.evaluate",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--workdir", required=True, help="a finished run or a convert --from-hf output")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = the latest")
    p.add_argument("--task", required=True, help="a shipped task name or a .jsonl task file")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--examples", type=int, default=0, help="score the first N (md5 order); 0 = all")
    p.add_argument("--shots", type=int, default=None, help="prompting: demonstrations (default 0)")
    p.add_argument("--scoring", choices=prompting.SCORINGS, default=None, help="prompting")
    p.add_argument("--normalize", action="store_true", help="rank: mean log-prob per token")
    p.add_argument("--seed", type=int, default=None, help="prompting: picks the demonstrations")
    p.add_argument("--seq-len", type=int, default=None, help="prompt budget; default max_len")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generate: tokens per answer")
    p.add_argument("--template", default=None, help="prompting: a query template with {input}")
    p.add_argument("--label-words", default=None, help='rank: "label=word,..." overrides')
    p.add_argument("--batch-size", type=int, default=None, help="prompts per decoding call")
    p.add_argument("--out", default=None, help="predictions JSONL (default in the workdir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.run("kiln.tools.evaluate", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    for flag, value, low in (("--examples", args.examples, 0), ("--step", args.step, -1)):
        if value < low:
            raise KilnError(f"{flag}={value} must be at least {low}.")
    options = {
        "shots": args.shots,
        "scoring": args.scoring,
        "normalize": True if args.normalize else None,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "label_words": args.label_words,
        "batch_size": args.batch_size,
    }
    prompting_options(ml_collections.ConfigDict({"model": {"max_len": 128}}), **options)
    init = ml_collections.ConfigDict({"workdir": args.workdir, "step": args.step})
    source = restore.resolve(init, "--")
    task_cfg = task_section(source.config, args.task)
    name = os.path.splitext(os.path.basename(args.task))[0]
    out = args.out or os.path.join(source.workdir, f"evaluation_{name}_{args.split}.jsonl")
    cli.check_output_file(out, "--out")
    evaluator = Evaluator(source, task_cfg, options)
    examples = examples_of(evaluator.task, args.split, args.examples)
    metrics, rows = evaluator.score(examples)
    if jax.process_index() != 0:
        return
    cli.write_text(out, "".join(json.dumps(r) + "\n" for r in rows), "--out")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(
        f"{evaluator.task.name} {args.split} ({len(examples)} examples, {evaluator.describe()},"
        f" step {source.step} of {source.workdir}): {shown}"
    )
    print(json.dumps({"metrics": metrics, "predictions": out}))


if __name__ == "__main__":
    sys.exit(main())
