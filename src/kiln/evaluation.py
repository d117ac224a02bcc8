"""Scoring a restored model on a labeled task without training: a run's head, its fine-tuned
text format, or prompting (`kiln.prompting`). `run_stage` is an evaluation-only run (a prompting
config, or `train.steps=0` routed here by `kiln.run`); `kiln.tools.evaluate` is its CLI."""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kiln import config_lib, defaults, finetuning, models, prompting, restore, sharding
from kiln import workdir as workdir_lib
from kiln.data import finetune, qa, tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError

SPLITS = ("train", "validation", "test")


def task_section(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The `task` section scoring `name` (a task or a .jsonl path): the run's own when it is the
    same task, else the defaults'."""
    base = defaults.run_sections(seq_len=1, batch=1, steps=1, lr=0.0, objective="").task
    own = config.get("task")
    is_path = name.endswith((".jsonl", ".json")) or os.sep in name
    same = own is not None and own.get("name") == name and not is_path
    section = ml_collections.ConfigDict(own.to_dict() if same else base.to_dict())
    if is_path:
        section.name = "squad" if name.endswith(".json") else "jsonl"
        section.path = os.path.abspath(os.path.expanduser(name))
    else:
        section.name = name
    return section


def restore_model(
    source: restore.Source,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    task: tasks.Task | None = None,
) -> tuple[nn.Module, Any]:
    """(model, per-layer parameters) of `source` (a PEFT run's with its base), with its head for
    `task` when `num_classes` > 0 (`restore.params_for_inference`)."""
    pooling = source.config.get("task", {}).get("pooling", "") if num_classes else ""
    head_pooling = finetuning.head_pooling(pooling, task)
    return restore.params_for_inference(source, mesh, num_classes, head_pooling)


def head_outputs(
    model: nn.Module,
    params: Any,
    config: ml_collections.ConfigDict,
    task: tasks.Task,
    examples: list[tasks.Example],
    tok: tokenizer_lib.AnyTokenizer,
) -> list[int] | list[float]:
    """A head's argmax class (or regression value) for each example, batched as the run did
    (none for extractive QA: its answers come from the span logits, `finetuning.predictions`)."""
    if not finetuning.num_classes(config.model.family, task) or task.kind == qa.KIND:
        return []
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
        self.model, self.params = restore_model(source, classes, self.mesh, self.task)
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


def check_stage(stage: ml_collections.ConfigDict) -> None:
    """A prompting run's rules: no training, a task, a run to start from, valid options."""
    i = stage.init_from
    if stage.train.steps != 0:
        raise KilnError(
            f"train.steps={stage.train.steps}: a config with a prompting section trains"
            " nothing; set train.steps=0 (arms.fewshot_stage does), or drop the prompting"
            " section to fine-tune."
        )
    if not stage.task.name or not (i.workdir or i.get("hf", "")):
        raise KilnError(
            "A prompting run needs task.name and init_from.workdir (or init_from.hf): the run"
            " it prompts, e.g. @pretrain in a pipeline."
        )
    prompting.Options(**stage.prompting.to_dict())


def run_stage(stage: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """A prompting run (a pipeline's `fewshot` stage): `stage.init_from` (a run) scored on
    `stage.task` as `stage.prompting` says; writes summary.json (step 0, validation/ and test/
    metrics) and predictions_test.jsonl in `workdir`, and returns the summary."""
    check_stage(stage)
    source = restore.resolve(stage.init_from, f"{workdir}: init_from.")
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
            with open(os.path.join(workdir, workdir_lib.PREDICTIONS), "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
    workdir_lib.write_summary(workdir, summary)
    return summary
