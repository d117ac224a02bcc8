"""Fine-tuning task metrics: accuracy, macro-F1, binary F1 and Matthews correlation
(classification); exact match, BLEU and chrF (sacrebleu, corpus level, default 13a
tokenisation), ROUGE-1/2/L/Lsum (rouge-score, F-measure averaged over examples) for
generation; Pearson, Spearman and mean squared error (regression); SQuAD v1.1's exact match
and token F1 against several gold answers (extractive QA, 0-100). `compute` scores by name.

Classification scores are on a 0-1 scale (correlations -1..1), generation scores on 0-100. A
correlation with a constant input is undefined and reported as 0.0.
"""

import collections
import re
import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.errors import KilnError

# The metrics `task.metrics` may choose, by task kind (the task's defaults: `tasks.Task.metrics`).
METRICS_BY_KIND = {
    "classification": ("accuracy", "macro_f1", "binary_f1", "matthews_corr"),
    "generation": (
        "chrf",
        "bleu",
        "exact_match",
        "rouge_1",
        "rouge_2",
        "rouge_l",
        "rouge_lsum",
    ),
    "regression": ("pearson", "spearman", "mse"),
    "extractive_qa": ("em", "f1"),
}
# Chat is scored on its last assistant turns as generation is (`kiln.data.chat`).
METRICS_BY_KIND["chat"] = METRICS_BY_KIND["generation"]
METRICS = tuple(dict.fromkeys(m for names in METRICS_BY_KIND.values() for m in names))


def binary_f1(predictions: Sequence[str], references: Sequence[str], positive: str) -> float:
    """F1 of the class `positive` against all others: 2 tp / (2 tp + fp + fn) (0.0 when
    `positive` occurs in neither list)."""
    check_lengths(predictions, references)
    tp = sum(p == positive and r == positive for p, r in zip(predictions, references))
    fp = sum(p == positive and r != positive for p, r in zip(predictions, references))
    fn = sum(p != positive and r == positive for p, r in zip(predictions, references))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corr(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Matthews correlation coefficient over all classes in either list (Gorodkin's K-class
    form; for two classes the familiar (tp tn - fp fn) / sqrt(...)); 0.0 when undefined."""
    check_lengths(predictions, references)
    classes = sorted(set(predictions) | set(references))
    index = {c: i for i, c in enumerate(classes)}
    confusion = np.zeros((len(classes), len(classes)), np.float64)
    for p, r in zip(predictions, references):
        confusion[index[r], index[p]] += 1
    n, correct = confusion.sum(), np.trace(confusion)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    numerator = correct * n - predicted @ actual
    denominator = np.sqrt((n * n - predicted @ predicted) * (n * n - actual @ actual))
    return float(numerator / denominator) if denominator else 0.0


def _rouge(key: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """rouge-score's `key` F-measure (no stemming) averaged over examples, 0-100."""
    from rouge_score import rouge_scorer

    check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=False)
    total = sum(scorer.score(r, p)[key].fmeasure for p, r in zip(predictions, references))
    return 100.0 * total / len(references)


def rouge_1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-1 (unigram overlap) F-measure averaged over examples, 0-100."""
    return _rouge("rouge1", predictions, references)


def rouge_2(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-2 (bigram overlap) F-measure averaged over examples, 0-100."""
    return _rouge("rouge2", predictions, references)


def rouge_lsum(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-Lsum (summary-level LCS over newline-separated sentences) F-measure averaged over
    examples, 0-100; equal to ROUGE-L for one-line texts."""
    return _rouge("rougeLsum", predictions, references)


def pearson(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Pearson's correlation coefficient; 0.0 if either side is constant."""
    check_lengths(predictions, references)
    x = np.asarray(predictions, np.float64) - np.mean(predictions)
    y = np.asarray(references, np.float64) - np.mean(references)
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(np.clip((x @ y) / denominator, -1.0, 1.0)) if denominator > 0 else 0.0


def ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties given their average rank (scipy's `rankdata` when importable)."""
    try:
        from scipy.stats import rankdata
    except ImportError:
        return average_ranks(values)
    return np.asarray(rankdata(values, method="average"), np.float64)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties averaged, in NumPy only."""
    array = np.asarray(values, np.float64)
    order = np.argsort(array, kind="stable")
    sorted_values = array[order]
    # Runs of equal values share the mean of the ranks they span.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(array)]
    out = np.empty(len(array), np.float64)
    for start, end in zip(starts, ends):
        out[order[start:end]] = (start + 1 + end) / 2
    return out


def spearman(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's of the average ranks; 0.0 if either is constant."""
    check_lengths(predictions, references)
    return pearson(ranks(predictions), ranks(references))


def mse(predictions: Sequence[float], references: Sequence[float]) -> float:
    """Mean squared error."""
    check_lengths(predictions, references)
    diff = np.asarray(predictions, np.float64) - np.asarray(references, np.float64)
    return float(np.mean(diff * diff))


def check_lengths(predictions: Sequence, references: Sequence) -> None:
    """Raises unless there are as many predictions as references, at least one."""
    if len(predictions) != len(references) or not len(references):
        raise KilnError(
            f"Metrics need as many predictions as references, at least one: got"
            f" {len(predictions)} and {len(references)}."
        )


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference."""
    check_lengths(predictions, references)
    return sum(p == r for p, r in zip(predictions, references)) / len(references)


def macro_f1(predictions: Sequence[str], references: Sequence[str], labels: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 over the classes of `labels` seen in either list.

    A prediction outside `labels` (a text-to-text model may generate anything) is wrong and
    counts against its reference's recall, but it is no class of its own.
    """
    check_lengths(predictions, references)
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
    check_lengths(predictions, references)
    return sum(normalize(p) == normalize(r) for p, r in zip(predictions, references)) / len(
        references
    )


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults), 0-100."""
    import sacrebleu

    check_lengths(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults), 0-100."""
    import sacrebleu

    check_lengths(predictions, references)
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """ROUGE-L F-measure (rouge-score, no stemming) averaged over examples, 0-100."""
    from rouge_score import rouge_scorer

    check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    total = sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
    return 100.0 * total / len(references)


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, punctuation removed, the articles a, an
    and the removed, whitespace runs collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)


def squad_f1_one(prediction: str, gold: str) -> float:
    """Token F1 of one prediction against one gold answer, both normalised (0 when they share
    no token, also when both are empty, as v1.1's script scores)."""
    predicted, wanted = squad_normalize(prediction).split(), squad_normalize(gold).split()
    same = sum((collections.Counter(predicted) & collections.Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_em(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Exact match after `squad_normalize`, the best over each example's gold answers, 0-100."""
    check_lengths(predictions, references)
    hits = [
        max(float(squad_normalize(p) == squad_normalize(g)) for g in _golds(golds))
        for p, golds in zip(predictions, references)
    ]
    return 100.0 * sum(hits) / len(hits)


def squad_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """`squad_f1_one`, the best over each example's gold answers, averaged, 0-100."""
    check_lengths(predictions, references)
    scores = [
        max(squad_f1_one(p, g) for g in _golds(golds)) for p, golds in zip(predictions, references)
    ]
    return 100.0 * sum(scores) / len(scores)


def _golds(golds: str | Sequence[str]) -> Sequence[str]:
    """An example's gold answers: a list of texts (one text counts as one answer)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise KilnError("An extractive QA example has no gold answer to score against.")
    return golds


def compute(
    names: Sequence[str],
    predictions: Sequence[Any],
    references: Sequence[Any],
    labels: Sequence[str] = (),
    positive: str = "",
) -> dict[str, float]:
    """The named metrics of predictions against references (`positive`: binary_f1's label,
    default the second of `labels`; regression values may be floats or their text)."""
    out = {}
    for name in names:
        if name == "macro_f1":
            out[name] = macro_f1(predictions, references, labels)
        elif name == "binary_f1":
            out[name] = binary_f1(predictions, references, positive or _second(labels))
        elif name in _PLAIN_METRICS:
            out[name] = _PLAIN_METRICS[name](predictions, references)
        elif name in _VALUE_METRICS:
            out[name] = _VALUE_METRICS[name](_floats(predictions), _floats(references))
        else:
            raise KilnError(f"Unknown metric {name!r}; kiln computes {', '.join(METRICS)}.")
    return out


_PLAIN_METRICS = {
    "accuracy": accuracy,
    "matthews_corr": matthews_corr,
    "exact_match": exact_match,
    "bleu": bleu,
    "chrf": chrf,
    "rouge_1": rouge_1,
    "rouge_2": rouge_2,
    "rouge_l": rouge_l,
    "rouge_lsum": rouge_lsum,
    "em": squad_em,
    "f1": squad_f1,
}


_VALUE_METRICS = {
    "pearson": pearson,
    "spearman": spearman,
    "mse": mse,
}


def _second(labels: Sequence[str]) -> str:
    if len(labels) < 2:
        raise KilnError(
            f"binary_f1 needs a positive label: the labels {list(labels)} have no second one."
            " Set task.positive_label."
        )
    return sorted(labels)[1]


def _floats(values: Sequence[Any]) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise KilnError(
            f"Regression metrics need numbers; got {values[:3]!r}... ({e}). Score regression"
            " tasks with a head model (bert, gpt)."
        ) from e
