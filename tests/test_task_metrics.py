"""Task metrics against hand-computed cases and independent formulas."""

import collections
import json
import math

import pytest

from kiln import config_lib, finetuning, task_metrics
from kiln.errors import KilnError


def test_accuracy_and_macro_f1_by_hand():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    assert task_metrics.accuracy(preds, refs) == pytest.approx(4 / 6)
    # a: tp 2, predicted 2, actual 3 -> 4/5; b: tp 1, 2, 2 -> 1/2; c: tp 1, 2, 1 -> 2/3.
    expected = (4 / 5 + 1 / 2 + 2 / 3) / 3
    assert task_metrics.macro_f1(preds, refs, ["a", "b", "c", "d"]) == pytest.approx(expected)


def test_macro_f1_invalid_prediction_is_wrong_but_no_class():
    refs = ["a", "b"]
    preds = ["a", "not a label"]
    # a: tp 1, predicted 1, actual 1 -> 1; b: tp 0, predicted 0, actual 1 -> 0.
    assert task_metrics.macro_f1(preds, refs, ["a", "b"]) == pytest.approx(0.5)


def test_exact_match_normalises_case_and_space():
    assert task_metrics.exact_match(["  Dog ", "big  cat", "x"], ["dog", "Big cat", "y"]) == (
        pytest.approx(2 / 3)
    )


def _bleu_by_formula(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU-4 from its definition (whitespace tokens, no smoothing)."""
    matches, totals = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        ht, rt = h.split(), r.split()
        hyp_len, ref_len = hyp_len + len(ht), ref_len + len(rt)
        for n in range(1, 5):
            hc = collections.Counter(tuple(ht[i : i + n]) for i in range(len(ht) - n + 1))
            rc = collections.Counter(tuple(rt[i : i + n]) for i in range(len(rt) - n + 1))
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            totals[n - 1] += max(len(ht) - n + 1, 0)
    log_p = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


def test_bleu_matches_its_definition():
    hyps = ["the cat sat on the mat today", "a dog ran in the big park"]
    refs = ["the cat sat on a mat today", "a dog ran in the park"]
    assert task_metrics.bleu(hyps, refs) == pytest.approx(_bleu_by_formula(hyps, refs), rel=1e-6)
    assert task_metrics.bleu(refs, refs) == pytest.approx(100.0)


def test_chrf_bounds_and_order():
    refs = ["in the beginning god created the heavens"]
    assert task_metrics.chrf(refs, refs) == pytest.approx(100.0)
    close = task_metrics.chrf(["in the beginning god created the heaven"], refs)
    far = task_metrics.chrf(["zzz qqq"], refs)
    assert 0.0 <= far < close < 100.0


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = (
                table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
            )
    return table[-1][-1]


def test_rouge_l_matches_lcs_by_hand():
    preds = ["return the sum of two numbers", "compute a matrix"]
    refs = ["return sum of the two numbers", "compute the determinant of a matrix"]
    expected = []
    for p, r in zip(preds, refs):
        lcs = _lcs(p.split(), r.split())
        precision, recall = lcs / len(p.split()), lcs / len(r.split())
        expected.append(2 * precision * recall / (precision + recall))
    assert task_metrics.rouge_l(preds, refs) == pytest.approx(100 * sum(expected) / 2)


def test_compute_and_bad_input():
    out = task_metrics.compute(["accuracy", "macro_f1"], ["a", "b"], ["a", "a"], ["a", "b"])
    assert out == {"accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 0.0) / 2)}
    with pytest.raises(KilnError, match="Unknown metric"):
        task_metrics.compute(["f2"], ["a"], ["a"])
    with pytest.raises(KilnError, match="as many predictions"):
        task_metrics.accuracy(["a"], ["a", "b"])


# ------------------------------------------------------- GLUE-style metrics and task.metrics


def test_binary_f1_by_hand_and_its_positive_label():
    refs = ["yes", "yes", "no", "no", "yes"]
    preds = ["yes", "no", "yes", "no", "yes"]
    # positive yes: tp 2, fp 1, fn 1 -> 4 / 6; positive no: tp 1, fp 1, fn 1 -> 2 / 4.
    assert task_metrics.binary_f1(preds, refs, "yes") == pytest.approx(4 / 6)
    assert task_metrics.binary_f1(preds, refs, "no") == pytest.approx(2 / 4)
    # The default positive label is the second sorted label ("yes" of no, yes).
    out = task_metrics.compute(["binary_f1"], preds, refs, ["no", "yes"])
    assert out["binary_f1"] == pytest.approx(4 / 6)
    assert task_metrics.compute(["binary_f1"], preds, refs, ["no", "yes"], "no")[
        "binary_f1"
    ] == pytest.approx(0.5)
    assert task_metrics.binary_f1(["a"], ["a"], "z") == 0.0


def _mcc_by_covariance(preds: list[str], refs: list[str]) -> float:
    """MCC as the correlation of the one-hot class matrices (Gorodkin's definition)."""
    classes = sorted(set(preds) | set(refs))
    x = [[float(p == c) for c in classes] for p in preds]
    y = [[float(r == c) for c in classes] for r in refs]

    def cov(a, b):
        n, k = len(a), len(classes)
        mean_a = [sum(row[j] for row in a) / n for j in range(k)]
        mean_b = [sum(row[j] for row in b) / n for j in range(k)]
        return sum(
            (a[i][j] - mean_a[j]) * (b[i][j] - mean_b[j]) for i in range(n) for j in range(k)
        )

    return cov(x, y) / math.sqrt(cov(x, x) * cov(y, y))


def test_matthews_correlation_binary_formula_and_multiclass():
    refs = ["p", "p", "p", "n", "n", "n", "n", "p"]
    preds = ["p", "p", "n", "n", "n", "p", "n", "p"]
    tp, tn, fp, fn = 3, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert task_metrics.compute(["matthews_corr"], preds, refs)["matthews_corr"] == (
        pytest.approx(expected)
    )
    refs3 = ["a", "b", "c", "a", "b", "c", "a"]
    preds3 = ["a", "c", "c", "b", "b", "a", "a"]
    assert task_metrics.matthews_corr(preds3, refs3) == pytest.approx(
        _mcc_by_covariance(preds3, refs3)
    )
    assert task_metrics.matthews_corr(refs3, refs3) == pytest.approx(1.0)
    assert task_metrics.matthews_corr(["a", "a"], ["a", "b"]) == 0.0  # Undefined: 0.


def _ngram_f(pred: str, ref: str, n: int) -> float:
    grams = (
        lambda t: collections.Counter(  # noqa: E731
            tuple(t.split()[i : i + n]) for i in range(len(t.split()) - n + 1)
        )
    )
    p, r = grams(pred), grams(ref)
    overlap = sum((p & r).values())
    precision, recall = overlap / sum(p.values()), overlap / sum(r.values())
    return 2 * precision * recall / (precision + recall) if overlap else 0.0


def test_rouge_1_2_and_lsum_by_hand():
    preds = ["the cat sat on the mat", "a quick brown fox"]
    refs = ["the cat lay on the mat", "the quick brown dog"]
    for name, n in (("rouge_1", 1), ("rouge_2", 2)):
        expected = 100 * sum(_ngram_f(p, r, n) for p, r in zip(preds, refs)) / 2
        assert task_metrics.compute([name], preds, refs)[name] == pytest.approx(expected)
    # One-line texts: Lsum is L. Two sentences: the union LCS of each reference sentence with
    # every predicted one: {a, b} + {d, e} = 4 hits of 5 tokens each side -> F 0.8.
    assert task_metrics.rouge_lsum(preds, refs) == pytest.approx(task_metrics.rouge_l(preds, refs))
    assert task_metrics.rouge_lsum(["a b\nd e f"], ["a b c\nd e"]) == pytest.approx(80.0)
    # Sentences in another order: every sentence matches (Lsum 100), the whole texts share an
    # LCS of 2 of 4 tokens (L 50).
    assert task_metrics.rouge_lsum(["d e\na b"], ["a b\nd e"]) == pytest.approx(100.0)
    assert task_metrics.rouge_l(["d e\na b"], ["a b\nd e"]) == pytest.approx(50.0)


def test_pearson_spearman_and_mse_against_formulas():
    x, y = [1.0, 2.0, 3.0, 4.0, 10.0], [2.0, 1.0, 4.0, 3.0, 5.0]
    mx, my = sum(x) / 5, sum(y) / 5
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    assert task_metrics.pearson(x, y) == pytest.approx(sxy / math.sqrt(sxx * syy))
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)); ranks of x 1..5, of y 2 1 4 3 5: sum d^2 = 4.
    assert task_metrics.spearman(x, y) == pytest.approx(1 - 6 * 4 / (5 * 24))
    # Ties take their average rank: [1, 2, 2, 3] -> [1, 2.5, 2.5, 4].
    assert task_metrics.average_ranks([1, 2, 2, 3]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert task_metrics.average_ranks([5, 1, 5, 5, 0]).tolist() == [4.0, 2.0, 4.0, 4.0, 1.0]
    tied_x, tied_y = [1, 2, 2, 3], [1, 3, 2, 4]
    assert task_metrics.spearman(tied_x, tied_y) == pytest.approx(
        task_metrics.pearson([1, 2.5, 2.5, 4], [1, 3, 2, 4])
    )
    assert task_metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0  # Constant: undefined -> 0.
    assert task_metrics.mse([1.0, 2.0], [2.0, 4.0]) == pytest.approx((1 + 4) / 2)
    # Regression references may be the examples' target texts.
    out = task_metrics.compute(["pearson", "mse"], [1.0, 2.0, 3.0], ["1.0", "2.0", "3.5"])
    assert out["pearson"] == pytest.approx(task_metrics.pearson([1, 2, 3], [1, 2, 3.5]))
    assert out["mse"] == pytest.approx(0.25 / 3)


def test_numpy_ranks_equal_scipys():
    scipy_stats = pytest.importorskip("scipy.stats")
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0, 3.0, 5.0]
    assert task_metrics.average_ranks(values).tolist() == list(
        scipy_stats.rankdata(values, method="average")
    )


def test_task_metrics_option_chooses_and_validates(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": f"t {i}", "label": "yes" if i % 2 else "no", "split": s}
        for i, s in enumerate(["train", "validation", "test"] * 4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = config_lib.load_config("experiments/bert/pretrain.py:size=tiny")
    config.task.name = "jsonl"
    config.task.path = str(path)
    assert finetuning.load(config.task).metrics == ("accuracy", "macro_f1")
    config.task.metrics = "matthews_corr, binary_f1"
    task = finetuning.load(config.task)
    assert task.metrics == ("matthews_corr", "binary_f1") and task.positive == "yes"
    config.task.positive_label = "no"
    assert finetuning.load(config.task).positive == "no"
    config.task.positive_label = "maybe"
    with pytest.raises(KilnError, match="positive_label='maybe' is not a label"):
        finetuning.load(config.task)
    config.task.positive_label = ""
    config.task.metrics = "accuracy,rouge_1"
    with pytest.raises(KilnError) as info:
        finetuning.load(config.task)
    message = str(info.value)
    assert "'rouge_1' is not a metric of classification tasks" in message
    assert "accuracy, macro_f1, binary_f1, matthews_corr" in message
    with pytest.raises(KilnError, match="pearson, spearman, mse"):
        finetuning.choose_metrics("regression", "accuracy")
    assert finetuning.choose_metrics("generation", "rouge_lsum,rouge_2") == (
        "rouge_lsum",
        "rouge_2",
    )
