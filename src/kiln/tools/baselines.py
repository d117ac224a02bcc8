"""Non-neural baselines for the reproduction study (`make reproduce`): what a fine-tuned model
has to beat. `score(name, task, train_examples, eval_examples)` trains baseline `name` on the
fine-tuning runs' train subset (`tasks.low_resource_subset`) and scores the validation and test
examples they score (`kiln.evaluation.examples_of`) with the task's metrics:

===================  ==============  ======================================================
baseline             task kind       prediction
===================  ==============  ======================================================
``majority``         classification  the most frequent train label
``tfidf_svm``        classification  TF-IDF (word 1-2 grams) + linear SVM, C on validation
``copy_input``       generation      the input itself
``tfidf_retrieval``  generation      the target of the most similar train input (cosine)
===================  ==============  ======================================================

scikit-learn (``requirements-reproduce.txt``) is imported only by the TF-IDF baselines.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from kiln import task_metrics
from kiln.data import tasks
from kiln.errors import KilnError

# The SVM's regularisation grid; the value with the best validation primary metric is kept.
C_GRID = (0.1, 0.3, 1.0, 3.0)
# Retrieval's terms: words and numbers; code's snake_case identifiers split into their words
# (a ROUGE-L point above whole identifiers on code_summary's validation split).
TOKEN_PATTERN = r"[A-Za-z][A-Za-z0-9]*|\d+"
# Cap on the dense similarity block of one retrieval chunk (queries x train inputs), ~64 MB.
MAX_BLOCK = 1 << 24
SEED = 0
EVAL_SPLITS = ("validation", "test")

Examples = Sequence[tasks.Example]
# (task, train subset, eval split -> examples) -> (choice, eval split -> predictions).
Baseline = Callable[[tasks.Task, Examples, dict[str, Examples]], tuple[str, dict[str, list[str]]]]


def _sklearn() -> Any:
    """The `sklearn` package, or a KilnError saying how to install it."""
    try:
        import sklearn.feature_extraction.text
        import sklearn.svm
    except ImportError as e:
        raise KilnError(
            f"The TF-IDF baselines need scikit-learn ({e}): pip install -r "
            "requirements-reproduce.txt (or run make reproduce)."
        ) from e
    return sklearn


def _metrics(task: tasks.Task, predictions: list[str], examples: Examples) -> dict[str, float]:
    references = [e.target for e in examples]
    return task_metrics.compute(task.metrics, predictions, references, task.labels, task.positive)


def majority(
    task: tasks.Task, train: Examples, evals: dict[str, Examples]
) -> tuple[str, dict[str, list[str]]]:
    """The most frequent train label everywhere (ties: the first in sorted order)."""
    counts = collections.Counter(e.target for e in train)
    label = min(counts, key=lambda label: (-counts[label], label))
    return "", {split: [label] * len(examples) for split, examples in evals.items()}


def tfidf_svm(
    task: tasks.Task, train: Examples, evals: dict[str, Examples]
) -> tuple[str, dict[str, list[str]]]:
    """TF-IDF (lower-cased word unigrams and bigrams, sublinear tf) fitted on the train inputs,
    one-vs-rest linear SVMs over `C_GRID`; the C with the best validation primary metric
    (the smallest on ties) predicts every split."""
    sklearn = _sklearn()
    targets = [e.target for e in train]
    if len(set(targets)) < 2:
        raise KilnError(
            f"tfidf_svm needs at least two labels among the train examples of {task.name!r};"
            f" got {sorted(set(targets))}. Use more train examples, or the majority baseline."
        )
    vectorizer = sklearn.feature_extraction.text.TfidfVectorizer(
        ngram_range=(1, 2), sublinear_tf=True, lowercase=True, dtype=np.float32
    )
    features = vectorizer.fit_transform([e.input for e in train])
    evaluated = {s: vectorizer.transform([e.input for e in ex]) for s, ex in evals.items()}
    best: tuple[float, float, Any] | None = None
    for c in C_GRID:
        model = sklearn.svm.LinearSVC(C=c, random_state=SEED, max_iter=10_000)
        model.fit(features, targets)
        predicted = [str(p) for p in model.predict(evaluated["validation"])]
        value = _metrics(task, predicted, evals["validation"])[task.metrics[0]]
        if best is None or value > best[0]:
            best = (value, c, model)
    assert best is not None
    _, c, model = best
    predictions = {s: [str(p) for p in model.predict(x)] for s, x in evaluated.items()}
    return f"C={c:g}", predictions


def copy_input(
    task: tasks.Task, train: Examples, evals: dict[str, Examples]
) -> tuple[str, dict[str, list[str]]]:
    """Each input as its own prediction (reads no train example)."""
    return "", {split: [e.input for e in examples] for split, examples in evals.items()}


def nearest(train_inputs: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """Per query, the index of the train input with the highest TF-IDF cosine similarity (ties
    and queries sharing no term with any train input: the lowest index). Scored in chunks of
    queries so that each dense similarity block holds at most `MAX_BLOCK` entries."""
    sklearn = _sklearn()
    vectorizer = sklearn.feature_extraction.text.TfidfVectorizer(
        token_pattern=TOKEN_PATTERN, sublinear_tf=True, lowercase=True, dtype=np.float32
    )
    keys = vectorizer.fit_transform(train_inputs).T.tocsr()  # rows are l2-normalised
    queried = vectorizer.transform(queries)
    chunk = max(1, MAX_BLOCK // max(1, len(train_inputs)))
    out = [
        np.asarray((queried[i : i + chunk] @ keys).toarray().argmax(axis=1)).reshape(-1)
        for i in range(0, len(queries), chunk)
    ]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def tfidf_retrieval(
    task: tasks.Task, train: Examples, evals: dict[str, Examples]
) -> tuple[str, dict[str, list[str]]]:
    """The target of the nearest train input (`nearest`) for each example."""
    if not train:
        raise KilnError(f"tfidf_retrieval has no train examples of {task.name!r} to retrieve.")
    inputs = [e.input for e in train]
    predictions = {
        split: [train[i].target for i in nearest(inputs, [e.input for e in examples])]
        for split, examples in evals.items()
    }
    return "", predictions


BASELINES: dict[str, Baseline] = {
    "majority": majority,
    "tfidf_svm": tfidf_svm,
    "copy_input": copy_input,
    "tfidf_retrieval": tfidf_retrieval,
}
# The task kind each baseline predicts for.
KIND = {
    "majority": "classification",
    "tfidf_svm": "classification",
    "copy_input": "generation",
    "tfidf_retrieval": "generation",
}


def score(name: str, task: tasks.Task, train_examples: int, eval_examples: int) -> dict[str, Any]:
    """Baseline `name` trained on the first `train_examples` train examples by md5 of the id
    (<= 0: all) and scored on the first `eval_examples` validation and test examples (0: all),
    as a fine-tuning run picks them.

    Returns:
        ``{"name", "labels": size of the train subset (copy_input reads none of it),
        "choice": hyperparameter chosen on validation ("" if none), "validation": {metric:
        value}, "test": {metric: value}}`` with the metrics of ``task.metrics``.

    Raises:
        KilnError: On an unknown baseline, one for another kind of task, or no scikit-learn.
    """
    if name not in BASELINES:
        raise KilnError(f"Unknown baseline {name!r}: use one of {', '.join(BASELINES)}.")
    if task.kind != KIND[name]:
        fits = [b for b, kind in KIND.items() if kind == task.kind]
        raise KilnError(
            f"Baseline {name!r} is for {KIND[name]} tasks; task {task.name!r} is {task.kind}."
            f" Use {' or '.join(fits) if fits else 'none of ' + ', '.join(BASELINES)} for it."
        )
    train = tasks.low_resource_subset(task.splits["train"], train_examples)
    evals = {s: _eval_split(task, s, eval_examples) for s in EVAL_SPLITS}
    choice, predictions = BASELINES[name](task, train, evals)
    out: dict[str, Any] = {"name": name, "labels": len(train), "choice": choice}
    for split in EVAL_SPLITS:
        out[split] = _metrics(task, predictions[split], evals[split])
    return out


def _eval_split(task: tasks.Task, split: str, n: int) -> list[tasks.Example]:
    """`kiln.evaluation.examples_of` without importing JAX: the first `n` by md5 (0: all)."""
    examples = task.splits[split]
    return tasks.low_resource_subset(examples, n) if n > 0 else list(examples)
