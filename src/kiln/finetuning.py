"""Fine-tuning runs' task side: the labeled task, its head, how the model answers, and
its metrics.

A run fine-tunes when `task.name` is set (its data: `kiln.inputs`). Classification uses a head
(`BertClassifier`, `GPTClassifier`) scored by argmax, regression the same head with one output;
T5 classifies text to text (the label word), and generation tasks are decoded with the KV cache
as the `decode` section says (greedy by default), then scored with `kiln.task_metrics`
(`task.metrics` chooses among `task_metrics.METRICS_BY_KIND`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from kiln import decoding, models, task_metrics
from kiln.data import chat, finetune, qa, task_rows, tasks, user_tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.errors import KilnError

# Extractive QA's defaults for configs written before `task.doc_stride`/`max_answer_len`.
DOC_STRIDE, MAX_ANSWER_LEN = 32, 30


def load(task_cfg: ml_collections.ConfigDict, data_dir: str = "") -> tasks.Task:
    """The labeled task named by the `task` section (`data_dir`: `data.data_dir`), with the
    metrics of `task.metrics` ("" = the task's defaults) and `task.positive_label`."""
    t = task_cfg
    labels = tuple(x.strip() for x in t.labels.split(",") if x.strip())
    task = user_tasks.load_any(
        t.name,
        data_dir=data_dir or None,
        path=t.path,
        kind=t.kind,
        labels=labels,
        fields=user_tasks.parse_fields(t.get("fields", "")),
    )
    names = choose_metrics(task.kind, t.get("metrics", "")) or task.metrics
    return dataclasses.replace(
        task,
        metrics=names,
        positive=positive_label(task, t.get("positive_label", ""), names),
        doc_stride=int(t.get("doc_stride", DOC_STRIDE)),
        max_answer_len=int(t.get("max_answer_len", MAX_ANSWER_LEN)),
    )


def check_model(model_cfg: ml_collections.ConfigDict, task: tasks.Task) -> None:
    """Raises unless the `model` section's family can fine-tune on `task` (its kind, pairs)."""
    family = models.family(model_cfg.family)
    family.check_task_kind(task.kind, task.name)
    if task.kind == chat.KIND and family.layout != Layout.DECODER:
        decoders = [f.name for f in models.FAMILIES.values() if f.layout == Layout.DECODER]
        raise KilnError(
            f"Task {task.name!r} is a chat task (the loss on assistant turns of a conversation),"
            f" which needs a decoder; model.family={model_cfg.family!r} is {family.layout}."
            f" Fine-tune a decoder family ({', '.join(decoders)})."
        )
    if task.pairs and family.uses_head(task.kind):
        family.check_pairs(model_cfg.get("type_vocab_size", 0), task.name)


def choose_metrics(kind: str, spec: str) -> tuple[str, ...]:
    """The metric names of `task.metrics` (comma-separated; "" -> ()) for a `kind` task;
    raises on a name kiln does not compute for that kind."""
    names = tuple(dict.fromkeys(x.strip() for x in spec.split(",") if x.strip()))
    valid = task_metrics.METRICS_BY_KIND.get(kind, ())
    bad = [n for n in names if n not in valid]
    if bad:
        raise KilnError(
            f"task.metrics={spec!r}: {', '.join(map(repr, bad))} is not a metric of {kind}"
            f' tasks. Use comma-separated names from: {", ".join(valid)} (or "" for the'
            " task's defaults)."
        )
    return names


def positive_label(task: tasks.Task, given: str, names: Sequence[str]) -> str:
    """`binary_f1`'s positive label: `given` (`task.positive_label`), else the second sorted
    label; "" when the task has no labels."""
    if given and given not in task.labels:
        raise KilnError(
            f"task.positive_label={given!r} is not a label of task {task.name!r}: use one of"
            f" {', '.join(map(repr, task.labels)) or 'its labels (it has none)'}."
        )
    if given:
        return given
    if "binary_f1" in names and len(task.labels) != 2:
        raise KilnError(
            f"task.metrics has binary_f1 but task {task.name!r} has {len(task.labels)} labels,"
            " not 2: set task.positive_label to the label scored one-vs-rest, or drop"
            " binary_f1."
        )
    return task.labels[1] if len(task.labels) > 1 else ""


def uses_head(family: str, task: tasks.Task) -> bool:
    """Whether a `family` model answers `task` with a head (bert, gpt classification and
    regression); t5 classifies by generating the label."""
    return models.family(family).uses_head(task.kind)


def num_classes(family: str, task: tasks.Task) -> int:
    """The head's output count for a `family` model on `task` (1 for regression; 0: no head)."""
    if not uses_head(family, task):
        return 0
    if task.kind == qa.KIND:
        return 2  # start, end
    return 1 if task.kind == "regression" else len(task.labels)


def head_pooling(pooling: str, task: tasks.Task | None) -> str:
    """The `pooling` a head model is built with: `task.pooling`, or the span head's
    (`models.SPAN`) for extractive QA."""
    return models.SPAN if task is not None and task.kind == qa.KIND else pooling


def template(task_cfg: ml_collections.ConfigDict, task: tasks.Task) -> str:
    """`task.template`, or the task's default (the encoder checks its {input} placeholder)."""
    return task_cfg.template or task.template


@dataclasses.dataclass(frozen=True)
class Answering:
    """How a fine-tuned model answers a task's examples: what `predictions` needs of a run."""

    family: str  # model.family
    seq_len: int  # data.seq_len: the prompt budget
    batch_size: int  # rows per decoding batch (data.global_batch_size)
    template: str  # the prompt template (`template`)
    decode: decoding.DecodeOptions  # max_new_tokens = task.target_len


def predictions(
    answering: Answering,
    task: tasks.Task,
    examples: list[tasks.Example],
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    classes: list[int] | list[float],
    mesh: jax.sharding.Mesh | None = None,
) -> list[str] | list[float]:
    """The model's answer for each of `examples` (a split's scored examples): text, or a float
    for regression.

    `classes` is a head's output for every row of the split's eval batches (the run's eval pass
    computes it): the argmax class, or the regression value; generation tasks are decoded with
    `answering.decode`, with rows sharded over `mesh` if given.
    """
    if task.kind == qa.KIND:
        return span_answers(answering, task, examples, model, params, tok)
    if uses_head(answering.family, task):
        if task.kind == "regression":
            return [float(v) for v in classes[: len(examples)]]
        return [task.labels[int(i)] for i in classes[: len(examples)]]
    prompts = [
        finetune.generation_prompt(
            task,
            models.family(answering.family).layout,
            tok,
            example,
            seq_len=answering.seq_len,
            max_new_tokens=answering.decode.max_new_tokens,
            template=answering.template,
        )
        for example in examples
    ]
    generated = decoding.generate(
        model,
        params,
        prompts,
        answering.decode,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        batch_size=answering.batch_size,
        mesh=mesh,
    )
    return [tok.decode(ids).strip() for ids in generated]


def score(
    answering: Answering,
    task: tasks.Task,
    examples: list[tasks.Example],
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    classes: list[int] | list[float],
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, float], list[str] | list[float]]:
    """(task metrics, predictions) of `examples`; the arguments as in `predictions`."""
    preds = predictions(answering, task, examples, model, params, tok, classes, mesh)
    refs: list = [example.target for example in examples]
    if task.kind == qa.KIND:
        refs = [[text for text, _ in example.answers] for example in examples]
    return task_metrics.compute(task.metrics, preds, refs, task.labels, task.positive), preds


def span_answers(
    answering: Answering,
    task: tasks.Task,
    examples: list[tasks.Example],
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
) -> list[str]:
    """A span head's answer to each extractive QA example: the best span over all windows of
    its context (`kiln.data.qa.answers`), the windows run in batches of `batch_size` rows."""
    encoded = qa.encode(tok, examples, seq_len=answering.seq_len, doc_stride=task.doc_stride)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, **b))
    size, logits = answering.batch_size, []
    for i in range(0, len(encoded.rows), size):
        rows = encoded.rows[i : i + size]
        batch = task_rows.pad_batch(rows, task.kind, task_rows.ENC, answering.seq_len, 1, size)
        inputs = {k: batch[k] for k in ("inputs", "segment_ids", "positions")}
        logits.append(np.asarray(forward(params, inputs))[: len(rows)])
    return qa.answers(encoded, np.concatenate(logits), examples, task.max_answer_len)


def copy_baseline(task: tasks.Task, examples: list[tasks.Example]) -> dict[str, float]:
    """Generation metrics of copying the input (kjv2web's reference point)."""
    names = [m for m in task.metrics if m in task_metrics.METRICS_BY_KIND["generation"]]
    return task_metrics.compute(names, [e.input for e in examples], [e.target for e in examples])
