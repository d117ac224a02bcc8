"""Fine-tuning task metrics: accuracy and macro-F1, exact match, BLEU and chrF, ROUGE-L.

BLEU and chrF come from sacrebleu (corpus level, default 13a tokenisation), ROUGE-L from
rouge-score (F-measure averaged over examples); all generation scores are on a 0-100 scale.
"""

import re
from collections.abc import Sequence

from kiln.errors import KilnError

METRICS = ("accuracy", "macro_f1", "exact_match", "bleu", "chrf", "rouge_l")


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
        elif name in METRICS:
            out[name] = globals()[name](predictions, references)
        else:
            raise KilnError(f"Unknown metric {name!r}; kiln computes {', '.join(METRICS)}.")
    return out


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references) or not references:
        raise KilnError(
            f"Metrics need as many predictions as references, at least one: got"
            f" {len(predictions)} and {len(references)}."
        )
