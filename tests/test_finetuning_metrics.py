"""Task metrics against hand-computed cases and independent formulas."""

import collections
import math

import pytest

from kiln import finetuning
from kiln.errors import KilnError


def test_accuracy_and_macro_f1_by_hand():
    refs = ["a", "a", "a", "b", "b", "c"]
    preds = ["a", "a", "b", "b", "c", "c"]
    assert finetuning.accuracy(preds, refs) == pytest.approx(4 / 6)
    # a: tp 2, predicted 2, actual 3 -> 4/5; b: tp 1, 2, 2 -> 1/2; c: tp 1, 2, 1 -> 2/3.
    expected = (4 / 5 + 1 / 2 + 2 / 3) / 3
    assert finetuning.macro_f1(preds, refs, ["a", "b", "c", "d"]) == pytest.approx(expected)


def test_macro_f1_invalid_prediction_is_wrong_but_no_class():
    refs = ["a", "b"]
    preds = ["a", "not a label"]
    # a: tp 1, predicted 1, actual 1 -> 1; b: tp 0, predicted 0, actual 1 -> 0.
    assert finetuning.macro_f1(preds, refs, ["a", "b"]) == pytest.approx(0.5)


def test_exact_match_normalises_case_and_space():
    assert finetuning.exact_match(["  Dog ", "big  cat", "x"], ["dog", "Big cat", "y"]) == (
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
    assert finetuning.bleu(hyps, refs) == pytest.approx(_bleu_by_formula(hyps, refs), rel=1e-6)
    assert finetuning.bleu(refs, refs) == pytest.approx(100.0)


def test_chrf_bounds_and_order():
    refs = ["in the beginning god created the heavens"]
    assert finetuning.chrf(refs, refs) == pytest.approx(100.0)
    close = finetuning.chrf(["in the beginning god created the heaven"], refs)
    far = finetuning.chrf(["zzz qqq"], refs)
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
    assert finetuning.rouge_l(preds, refs) == pytest.approx(100 * sum(expected) / 2)


def test_compute_and_bad_input():
    out = finetuning.compute(["accuracy", "macro_f1"], ["a", "b"], ["a", "a"], ["a", "b"])
    assert out == {"accuracy": 0.5, "macro_f1": pytest.approx((2 / 3 + 0.0) / 2)}
    with pytest.raises(KilnError, match="Unknown metric"):
        finetuning.compute(["f2"], ["a"], ["a"])
    with pytest.raises(KilnError, match="as many predictions"):
        finetuning.accuracy(["a"], ["a", "b"])
