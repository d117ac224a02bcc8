"""Fine-tuning runs' task side: the labeled task, its head, and its metrics (accuracy, BLEU...).

A run fine-tunes when `task.name` is set (its data: `kiln.inputs`). Classification uses a head
(`BertClassifier`, `GPTClassifier`) scored by argmax; T5 classifies text to text (the label
word), and generation tasks are decoded with the KV cache as the `decode` section says (greedy
by default), then scored with `task_metrics`.
"""

from typing import Any

import jax
import ml_collections

from kiln import config_lib, decoding, models, task_metrics
from kiln.data import finetune, tasks
from kiln.data import tokenizer as tokenizer_lib


def load(task_cfg: ml_collections.ConfigDict, data_dir: str = "") -> tasks.Task:
    """The labeled task named by the `task` section (`data_dir`: `data.data_dir`)."""
    t = task_cfg
    labels = tuple(x.strip() for x in t.labels.split(",") if x.strip())
    return tasks.load_task(
        t.name, data_dir=data_dir or None, path=t.path, kind=t.kind, labels=labels
    )


def uses_head(family: str, task: tasks.Task) -> bool:
    """Whether a `family` model answers `task` with a head (bert, gpt classification); t5
    classifies by generating the label."""
    return models.family(family).uses_head(task.kind)


def num_classes(family: str, task: tasks.Task) -> int:
    """The head's class count for a `family` model on `task` (0: no head)."""
    return len(task.labels) if uses_head(family, task) else 0


def template(task_cfg: ml_collections.ConfigDict, task: tasks.Task) -> str:
    """`task.template`, or the task's default (the encoder checks its {input} placeholder)."""
    return task_cfg.template or task.template


def predictions(
    config: ml_collections.ConfigDict,
    task: tasks.Task,
    examples: list[tasks.Example],
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """The model's answer for each of `examples` (a split's scored examples), as text.

    `classes` is a classifier head's argmax class of every row of the split's eval batches
    (the run's eval pass computes it); generation tasks decode per the `decode` section, with
    rows sharded over `mesh` if given.
    """
    if uses_head(config.model.family, task):
        return [task.labels[i] for i in classes[: len(examples)]]
    new_tokens = config.task.target_len
    prompts = [
        finetune.generation_prompt(
            task,
            models.family(config.model.family).layout,
            tok,
            example,
            seq_len=config.data.seq_len,
            max_new_tokens=new_tokens,
            template=template(config.task, task),
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
    task: tasks.Task,
    examples: list[tasks.Example],
    model: Any,
    params: Any,
    tok: tokenizer_lib.Tokenizer,
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, float], list[str]]:
    """(task metrics, predictions) of `examples`; the arguments as in `predictions`."""
    preds = predictions(config, task, examples, model, params, tok, classes, mesh)
    refs = [example.target for example in examples]
    return task_metrics.compute(task.metrics, preds, refs, task.labels), preds


def copy_baseline(task: tasks.Task, examples: list[tasks.Example]) -> dict[str, float]:
    """Generation metrics of copying the input (kjv2web's reference point)."""
    names = [m for m in task.metrics if m in ("bleu", "chrf", "rouge_l", "exact_match")]
    return task_metrics.compute(names, [e.input for e in examples], [e.target for e in examples])
