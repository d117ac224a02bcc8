"""Extractive QA: SQuAD metrics, the SQuAD reader's checks, character offsets, windows and
labels, the best span over windows (`kiln.data.squad`, `kiln.data.qa`, `task_metrics`), and a
tiny BERT that learns a cued span through `kiln.run` (far above trivial baselines)."""

import json

import numpy as np
import pytest

from kiln import arms, run, task_metrics
from kiln.data import corpus, qa, squad, tasks, user_tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from test_task_formats_run import _pretrain


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    docs = corpus.read_documents("bible,wordnet", "train", data_dir="data/tiny")[:300]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer_lib.train_tokenizer(docs, path, vocab_size=512, model_type="bpe", seed=0)
    return tokenizer_lib.load_tokenizer(path)


@pytest.mark.parametrize(
    "prediction, golds, em, f1",
    [
        ("The Cat!", ["cat"], 100.0, 100.0),  # case, punctuation, article
        ("a black cat", ["the cat"], 0.0, 100.0 * 2 * 0.5 * 1.0 / 1.5),  # p 1/2, r 1
        ("cat sat", ["dog", "sat on"], 0.0, 50.0),  # best gold: p 1/2, r 1/2
        ("an", ["the"], 100.0, 0.0),  # both normalise to "": equal, but no token in common
        ("rock and roll", ["Rock & Roll"], 0.0, 100.0 * 2 * (2 / 3) * 1 / (2 / 3 + 1)),
    ],
)
def test_squad_em_and_f1_by_hand(prediction, golds, em, f1):
    scores = task_metrics.compute(["em", "f1"], [prediction], [golds])
    assert scores["em"] == pytest.approx(em) and scores["f1"] == pytest.approx(f1)


def test_squad_metrics_average_over_examples():
    preds, golds = ["Paris", "in 1923", "x"], [["paris"], ["1923"], ["y", "x."]]
    scores = task_metrics.compute(["em", "f1"], preds, golds)
    assert scores["em"] == pytest.approx(100 * 2 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)  # "in 1923": p 1/2, r 1


class Chars:
    """A tokenizer with no offsets of its own: every character is a token (space dropped)."""

    cls_id, sep_id = 1, 2

    def encode(self, text):
        return [ord(c) for c in text if c != " "]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_prefix_offsets_map_each_token_to_its_characters():
    text = "a  big dog."
    ids, offsets = qa.prefix_offsets(Chars(), text)
    assert [text[a:b] for a, b in offsets] == [chr(i) for i in ids] == list("abigdog.")


def test_sentencepiece_offsets_slice_the_text(tiny_tokenizer):
    text = "In the beginning God created  the heaven and the earth."
    ids, offsets = qa.encode_with_offsets(tiny_tokenizer, text)
    assert ids == tiny_tokenizer.encode(text)
    pieces = [tiny_tokenizer.id_to_piece(i).replace("\u2581", " ").strip() for i in ids]
    assert [text[a:b] for a, b in offsets] == pieces
    # Decoding prefixes (any tokenizer) finds the same spans (a lone space piece is empty).
    prefix_ids, by_prefix = qa.prefix_offsets(tiny_tokenizer, text)
    assert prefix_ids == ids and len(by_prefix) == len(offsets)
    assert [o for o in by_prefix if o[0] < o[1]] == [o for o in offsets if o[0] < o[1]]
    # Byte pieces of a character outside the vocabulary still tile the text.
    text = "God créated it"
    ids, offsets = qa.encode_with_offsets(tiny_tokenizer, text)
    assert "".join(text[a:b] for a, b in offsets) == text.replace(" ", "")


def _example(context, answer, qid="q"):
    return tasks.Example(
        qid, "q?", answer, context=context, answers=((answer, context.index(answer)),)
    )


def test_labels_point_at_the_answer_and_stride_finds_it_in_the_second_window():
    context = "abcdefghijklmnop"
    # seq_len 13: question "q?" (2 tokens) + 3 specials leave 8 context tokens; stride 3 gives
    # windows starting at 0, 5, 10. "ghi" (tokens 6-8) crosses the first window's end.
    encoded = qa.encode(Chars(), [_example(context, "ghi")], seq_len=13, doc_stride=3)
    assert [w.start for w in encoded.windows] == [0, 5, 10]
    targets = [tuple(r["targets"]) for r in encoded.rows]
    assert targets == [(0, 0), (4 + 1, 4 + 3), (0, 0)]  # row offset 4: [CLS] q ? [SEP]
    second = encoded.rows[1]["inputs"]
    assert "".join(chr(i) for i in second[5:8]) == "ghi"
    # Logits that favour the answer in window 2 (and a worse span in window 1) recover it.
    logits = np.zeros((3, 2, 13), np.float32)
    logits[0, :, 5] = 1.0
    logits[1, 0, 5], logits[1, 1, 7] = 3.0, 3.0
    assert qa.answers(encoded, logits, [_example(context, "ghi")], 30) == ["ghi"]
    # max_answer_len bounds the span: 2 tokens cannot hold "ghi".
    assert qa.answers(encoded, logits, [_example(context, "ghi")], 2) != ["ghi"]


def test_best_span_never_ends_before_it_starts():
    window = qa.Window(example=0, start=0, offset=1, length=4)
    start, end = np.zeros(6), np.zeros(6)
    start[4], end[1] = 5.0, 5.0  # the best start lies after the best end
    _, first, last = qa.best_span(start, end, window, 30)
    assert first <= last


def _write(tmp_path, qas, context="The cat sat on the mat.", name="s.json"):
    path = tmp_path / name
    paragraphs = [{"context": context, "qas": qas}]
    path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.mark.parametrize(
    "qa_record, words",
    [
        ({"question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]}, ["no 'id'"]),
        ({"id": "q1", "answers": [{"text": "cat", "answer_start": 4}]}, ["'q1'", "'question'"]),
        ({"id": "q2", "question": "Who?"}, ["'q2'", "'answers'"]),
        ({"id": "q3", "question": "Who?", "answers": [{"text": "cat"}]}, ["'q3'", "answer_start"]),
        (
            {"id": "q4", "question": "Who?", "answers": [{"text": "cat", "answer_start": 5}]},
            ["'q4'", "does not match", "occurs at 4"],
        ),
        (
            {"id": "q5", "question": "Who?", "answers": [{"text": "mat.", "answer_start": 40}]},
            ["'q5'", "outside its context"],
        ),
    ],
)
def test_bad_squad_files_name_the_file_the_question_and_the_fix(tmp_path, qa_record, words):
    path = _write(tmp_path, [qa_record])
    with pytest.raises(KilnError) as error:
        squad.load_squad(str(path))
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value)


def test_squad_splits_by_file_and_dispatch(tmp_path):
    good = [{"id": "q", "question": "Who?", "answers": [{"text": "cat", "answer_start": 4}]}]
    train, dev = _write(tmp_path, good, name="train.json"), _write(tmp_path, good, name="dev.json")
    task = user_tasks.load_any("squad", path=f"train={train},validation={dev}")
    assert task.kind == "extractive_qa" and task.metrics == ("f1", "em")
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [1, 1, 1]
    assert task.splits["test"][0].answers == (("cat", 4),)
    with pytest.raises(KilnError, match="needs train= and validation="):
        squad.load_squad(f"train={train}")
    with pytest.raises(KilnError, match="reads your own file"):
        tasks.load_task("squad", path=str(train))


_FILLERS = "river stone light city train model north south old new bright quiet".split()


def _cued_squad(path, answers, fillers, n, seed):
    """SQuAD JSON of `n` questions: filler words and one capital-letter decoy around "the
    answer is X ." (X another capital letter); the gold answer is X, found only by the cue."""
    rng = np.random.default_rng(seed)
    articles = []
    for i in range(n):
        answer, decoy = (str(x) for x in rng.choice(answers, 2, replace=False))
        words = [*rng.choice(fillers, rng.integers(1, 4)), decoy]
        rng.shuffle(words)
        cut = int(rng.integers(0, len(words) + 1))
        head = " ".join([*words[:cut], "the answer is"]) + " "
        context = head + answer + " . " + " ".join(words[cut:])
        qas = [{"id": f"{seed}-{i}", "question": "Which?",
                "answers": [{"text": answer, "answer_start": len(head)}]}]  # fmt: skip
        articles.append({"title": f"{seed}-{i}", "paragraphs": [{"context": context, "qas": qas}]})
    path.write_text(json.dumps({"data": articles}))
    return str(path)


@pytest.mark.slow
def test_a_tiny_bert_learns_a_cued_span_well_above_trivial_baselines(tmp_path):
    source = str(tmp_path / "pretrain")
    pretrain = _pretrain("bert", source, max_len=64)
    answers, fillers = list("QZXJKVWY"), _FILLERS
    train = _cued_squad(tmp_path / "train.json", answers, fillers, 320, seed=0)
    dev = _cued_squad(tmp_path / "dev.json", answers, fillers, 60, seed=1)
    config = arms.finetune_stage(
        pretrain, task="squad", train_examples=320, epochs=3, lr=2e-3, seq_len=64, batch=16,
        init_from=source,
    )  # fmt: skip
    config.tokenizer.path = source
    config.task.path = f"train={train},validation={dev}"
    config.task.max_answer_len, config.task.doc_stride = 4, 16
    summary = run.train_and_evaluate(config, str(tmp_path / "qa"))
    assert summary["step"] == config.train.steps == 60

    # Trivial baselines on the same test questions: the first word of the context, and the
    # expected EM of a random word of it and of a random capital letter (answer or decoy).
    examples = user_tasks.load_any("squad", path=config.task.path).splits["test"]
    golds = [[text for text, _ in e.answers] for e in examples]
    first = task_metrics.compute(["em"], [e.context.split()[0] for e in examples], golds)["em"]
    random_word, random_letter = (
        100 * np.mean([np.mean([w == g[0] for w in pick(e.context.split())]) for e, g in
                       zip(examples, golds)])
        for pick in (lambda ws: ws, lambda ws: [w for w in ws if w in answers])
    )  # fmt: skip
    assert random_letter == 50.0 and first < 50.0 and random_word < 50.0
    baseline = max(first, random_word, random_letter)
    assert summary["test/em"] >= baseline + 30.0, (summary["test/em"], baseline)
    assert summary["test/f1"] >= summary["test/em"]
