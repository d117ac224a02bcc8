"""Fine-tuning runs' task side: the labeled task, its head, how the model answers, and the
task metrics.

A run fine-tunes when `task.name` is set (its data: `kiln.inputs`). Classification uses a head
(`BertClassifier`, `GPTClassifier`) scored by argmax; T5 classifies text to text (the label
word), and generation tasks are decoded with the KV cache as the `decode` section says (greedy
by default). Metrics: accuracy and macro-F1, exact match, BLEU and chrF (sacrebleu, corpus
level, default 13a tokenisation), ROUGE-L (rouge-score, F-measure averaged over examples); all
generation scores are on a 0-100 scale.
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from kiln import decoding, models
from kiln.data import finetune, tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError

METRICS = ("accuracy", "macro_f1", "exact_match", "bleu", "chrf", "rouge_l")


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
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """The model's answer for each of `examples` (a split's scored examples), as text.

    `classes` is a classifier head's argmax class of every row of the split's eval batches
    (the run's eval pass computes it); generation tasks are decoded with `answering.decode`,
    with rows sharded over `mesh` if given.
    """
    if uses_head(answering.family, task):
        return [task.labels[i] for i in classes[: len(examples)]]
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
    classes: list[int],
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, float], list[str]]:
    """(task metrics, predictions) of `examples`; the arguments as in `predictions`."""
    preds = predictions(answering, task, examples, model, params, tok, classes, mesh)
    refs = [example.target for example in examples]
    return compute(task.metrics, preds, refs, task.labels), preds


def copy_baseline(task: tasks.Task, examples: list[tasks.Example]) -> dict[str, float]:
    """Generation metrics of copying the input (kjv2web's reference point)."""
    names = [m for m in task.metrics if m in ("bleu", "chrf", "rouge_l", "exact_match")]
    return compute(names, [e.input for e in examples], [e.target for e in examples])


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference."""
    _check(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes of `labels` seen in either list.

    A prediction outside `labels` (a text-to-text model may generate anything) is wrong and
    counts against its reference's recall, but it is no class of its own.
    """
    _check(predictions, references)
    known = set(labels)
    classes = sorted({r for r in references if r in known} | {p for p in predictions if p in known})
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        predicted = sum(p == c for p in predictions)
        actual = sum(r == c for r in references)
        scores.append(2 * tp / (predicted + actual) if predicted + actual else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed: what exact match compares."""
    return re.sub(r"\s+", " ", text.strip().lower())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after `normalize`."""
    _check(predictions, references)
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(
        references
    )


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0-100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults), 0-100."""
    import sacrebleu

    _check(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score, no stemming) averaged over examples, 0-100."""
    from rouge_score import rouge_scorer

    _check(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return 100.0 * total / len(references)


def compute(
    names: Sequence[str],
    predictions: Sequence[str],
    references: Sequence[str],
    labels: Sequence[str] = (),
) -> dict[str, float]:
    """The named metrics of predictions against references."""
    out = {}
    for name in names:
        if name == "macro_f1":
            out[name] = macro_f1(predictions, references, labels)
        elif name in _PLAIN_METRICS:
            out[name] = _PLAIN_METRICS[name](predictions, references)
        else:
            raise KilnError(f"Unknown metric {name!r}; kiln computes {', '.join(METRICS)}.")
    return out


_PLAIN_METRICS = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "bleu": bleu,
    "chrf": chrf,
    "rouge_l": rouge_l,
}


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not references:
        raise KilnError(
            f"Metrics need as many predictions as references, at least one: got"
            f" {len(predictions)} and {len(references)}."
        )
