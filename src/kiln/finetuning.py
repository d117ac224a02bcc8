"""Fine-tuning runs: labeled task data for the loop, and task metrics (accuracy, BLEU, ...).

A run fine-tunes when `task.name` is set. Classification uses a head (`BertClassifier`,
`GPTClassifier`) scored by argmax; T5 classifies text to text (the label word), and generation
tasks are decoded with the KV cache as the `decode` section says (greedy by default), then
scored with `task_metrics`.
"""

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from kiln import config_lib, decoding, metrics, task_metrics
from kiln.data import finetune, pipeline, tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError


@dataclasses.dataclass
class TaskData:
    """The task, its encoded train stream and eval batches, and the examples scored."""

    task: tasks.Task
    train_iter: Any
    validation: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    examples: dict[str, list[tasks.Example]]  # "validation" | "test" -> examples scored


def load(config: ml_collections.ConfigDict) -> tasks.Task:
    """The labeled task named by the `task` section."""
    t = config.task
    labels = tuple(x.strip() for x in t.labels.split(",") if x.strip())
    return tasks.load_task(
        t.name, data_dir=config.data.data_dir or None, path=t.path, kind=t.kind, labels=labels
    )


def uses_head(config: ml_collections.ConfigDict, task: tasks.Task) -> bool:
    """Classification with a head (bert, gpt); t5 classifies by generating the label."""
    return task.kind == "classification" and config.model.family != "t5"


def num_classes(config: ml_collections.ConfigDict, task: tasks.Task) -> int:
    return len(task.labels) if uses_head(config, task) else 0


def template(config: ml_collections.ConfigDict, task: tasks.Task) -> str:
    """`task.template`, or the task's default (the encoder checks its {input} placeholder)."""
    return config.task.template or task.template


def prepare(
    config: ml_collections.ConfigDict, task: tasks.Task, tok: tokenizer_lib.Tokenizer
) -> TaskData:
    """Encodes the training subset and the validation/test examples for the loop."""
    t, d = config.task, config.data
    family = config.model.family
    if task.kind == "generation" and family == "bert":
        raise KilnError(
            f"task.name={t.name!r} is a generation task and model.family='bert' cannot generate;"
            " use a gpt or t5 model (or a classification task)."
        )
    if t.pack and not (family == "gpt" and task.kind == "generation"):
        raise KilnError("task.pack=True packs gpt prompt -> completion examples only; set False.")
    train = tasks.low_resource_subset(task.splits["train"], t.train_examples)
    common = dict(seq_len=d.seq_len, target_len=t.target_len, template=template(config, task))
    dataset, cut = finetune.make_train_dataset(
        task,
        family,
        tok,
        train,
        global_batch_size=d.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pack=t.pack,
        **common,
    )
    target_len = t.target_len if task.kind == "generation" or family == "t5" else 0
    _log_truncated("train", cut, len(train), d.seq_len, target_len)
    examples, batches = {}, {}
    for split in ("validation", "test"):
        chosen = task.splits[split]
        if t.eval_examples > 0:
            chosen = tasks.low_resource_subset(chosen, t.eval_examples)
        examples[split] = chosen
        full, cut = finetune.make_eval_batches(
            task, family, tok, chosen, batch_size=d.global_batch_size, **common
        )
        index, count = jax.process_index(), jax.process_count()
        batches[split] = [pipeline.process_slice(b, index, count) for b in full]
        _log_truncated(split, cut, len(chosen), d.seq_len, target_len)
    metrics.log(
        f"Task {task.name} ({task.kind}): {len(train):,} training examples of"
        f" {len(task.splits['train']):,}; {len(examples['validation']):,} validation and"
        f" {len(examples['test']):,} test examples scored"
    )
    return TaskData(task, iter(dataset), batches["validation"], batches["test"], examples)


def _log_truncated(split: str, cut: int, total: int, seq_len: int, target_len: int) -> None:
    if cut:
        limit = f" (or task.target_len={target_len})" if target_len else ""
        metrics.log(
            f"Note: {cut:,} of {total:,} {split} examples were longer than data.seq_len={seq_len}"
            f"{limit} and were truncated"
        )


def predictions(
    config: ml_collections.ConfigDict,
    data: TaskData,
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    split: str,
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """The model's answer for every scored example of `split`, as text.

    `classes` is a classifier head's argmax class of every row of the split's eval batches
    (the run's eval pass computes it); generation tasks decode per the `decode` section, with
    rows sharded over `mesh` if given.
    """
    task, examples = data.task, data.examples[split]
    if uses_head(config, task):
        return [task.labels[i] for i in classes[: len(examples)]]
    new_tokens = config.task.target_len
    prompts = [
        finetune.generation_prompt(
            task,
            config.model.family,
            tok,
            example,
            seq_len=config.data.seq_len,
            max_new_tokens=new_tokens,
            template=template(config, task),
        )
        for example in examples
    ]
    generated = decoding.generate(
        model,
        params,
        prompts,
        config_lib.decode_options(config, new_tokens),
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        batch_size=config.data.global_batch_size,
        mesh=mesh,
    )
    return [tok.decode(ids).strip() for ids in generated]


def score(
    config: ml_collections.ConfigDict,
    data: TaskData,
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    split: str,
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, float], list[str]]:
    """(task metrics, predictions) of `split`; `classes` and `mesh` as in `predictions`."""
    preds = predictions(config, data, model, params, tok, split, classes, mesh)
    refs = [example.target for example in data.examples[split]]
    return task_metrics.compute(data.task.metrics, preds, refs, data.task.labels), preds


def copy_baseline(data: TaskData, split: str) -> dict[str, float]:
    """Generation metrics of copying the input (kjv2web's reference point)."""
    examples = data.examples[split]
    names = [m for m in data.task.metrics if m in ("bleu", "chrf", "rouge_l", "exact_match")]
    return task_metrics.compute(names, [e.input for e in examples], [e.target for e in examples])
