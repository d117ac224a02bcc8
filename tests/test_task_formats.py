"""Task formats from the user's files: sentence pairs and regression (kiln.data.user_tasks,
their encodings in kiln.data.finetune), the regression loss, token types reaching BERT, and the
Family checks."""

import itertools
import json
import random

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln import finetuning, losses, models
from kiln.data import finetune, tasks, user_tasks
from kiln.data.tasks import Example, Task
from kiln.data.tokenizer import Tokenizer, train_tokenizer
from kiln.errors import KilnError
from kiln.models import heads
from kiln.models.layers import TransformerConfig

CLS, SEP, BOS, EOS = 5, 6, 2, 3
SPLITS = ("train", "validation", "test")
_WORDS = (
    "the a river stone light moves over under quietly bright old new city train model data "
    "token north south sings runs café and of with"
).split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(1)
    docs = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 30))) for _ in range(400)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=500)


def write(path, records) -> str:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def pair_records(n: int = 9, **extra) -> list[dict]:
    return [
        {"s1": f"first {i}", "s2": f"second {i}", "y": "same" if i % 2 else "diff",
         "split": SPLITS[i % 3], **extra}
        for i in range(n)
    ]  # fmt: skip


def pair_task(labels=("diff", "same"), kind="classification") -> Task:
    examples = [
        Example("p0", "the old river", labels[0] if labels else "1.0", pair="north and south")
    ]
    splits = {s: list(examples) for s in SPLITS}
    return Task("pairs", kind, labels, (), tasks.PAIR_TEMPLATE, splits, pairs=True)


# ------------------------------------------------------------------------------- JSONL files


def test_jsonl_sentence_pairs_with_renamed_fields(tmp_path):
    path = write(tmp_path / "p.jsonl", pair_records())
    fields = user_tasks.parse_fields("text=s1, text_pair=s2,label=y")
    task = user_tasks.load_any("jsonl", path=path, fields=fields)
    assert task.kind == "classification" and task.pairs and task.labels == ("diff", "same")
    assert task.template == tasks.PAIR_TEMPLATE
    first = task.splits["train"][0]
    assert (first.input, first.pair, first.target) == ("first 0", "second 0", "diff")


def test_jsonl_regression_inferred_from_numeric_labels(tmp_path):
    records = [{"text": f"a {i}", "text_pair": f"b {i}", "label": i / 4} for i in range(9)]
    for i, r in enumerate(records):
        r["split"] = SPLITS[i % 3]
    records[3]["label"] = 2  # An integer is a number too.
    task = user_tasks.load_any("jsonl", path=write(tmp_path / "r.jsonl", records))
    assert task.kind == "regression" and task.labels == () and task.pairs
    assert task.metrics == ("pearson", "spearman", "mse")
    assert [float(e.target) for e in task.splits["train"]] == [0.0, 2.0, 1.5]
    # With kind regression, numeric strings are values too.
    text = [{**r, "label": str(r["label"])} for r in records]
    given = user_tasks.load_any("jsonl", path=write(tmp_path / "s.jsonl", text), kind="regression")
    assert [e.target for e in given.splits["train"]] == ["0.0", "2.0", "1.5"]


def error_of(tmp_path, records, **kwargs) -> str:
    with pytest.raises(KilnError) as info:
        user_tasks.load_any("jsonl", path=write(tmp_path / "bad.jsonl", records), **kwargs)
    return str(info.value)


def test_bad_pair_and_regression_files(tmp_path):
    good = [{"text": f"t{i}", "text_pair": f"u{i}", "label": 0.5, "split": s}
            for i, s in enumerate(SPLITS * 2)]  # fmt: skip
    message = error_of(tmp_path, [*good, {"text": "x", "label": 1.0}])
    assert "line 7: lacks a 'text_pair' field but line 1 has one" in message
    message = error_of(tmp_path, [*good, {"text": "x", "text_pair": "y", "label": "high"}])
    assert "line 7: the 'label' field is 'high', not a finite number" in message
    message = error_of(tmp_path, [*good, {"text": "x", "text_pair": " ", "label": 1}])
    assert "line 7: the 'text_pair' field is empty" in message
    message = error_of(tmp_path, [{"input": "x", "target": "y", "text_pair": "z"}])
    assert "line 1: 'text_pair' is for text/label lines" in message
    message = error_of(tmp_path, good, labels=["a"], kind="regression")
    assert "labels only apply to classification" in message
    # Renamed fields are named as the file names them.
    records = [{"s1": "x", "y": 1.0, "split": "train"}]
    message = error_of(tmp_path, records, fields={"text": "s1", "text_pair": "s2", "label": "z"})
    assert "line 1: the 'z' field is missing" in message
    with pytest.raises(KilnError, match="bad entry 'txt=a'"):
        user_tasks.parse_fields("txt=a")
    with pytest.raises(KilnError, match="only for the user-file tasks"):
        tasks.load_task("wn_lexname", fields={"text": "a"})


# ------------------------------------------------------------------------------------ encoding


def test_longest_first_equals_cutting_one_token_at_a_time():
    for a, b, budget in itertools.product(range(8), range(8), range(0, 12)):
        x, y = a, b
        while x + y > budget:
            if x > y:
                x -= 1
            else:
                y -= 1
        assert finetune.longest_first(a, b, budget) == (x, y), (a, b, budget)


def test_bert_pair_rows_have_token_types_and_cut_the_longer_text(tok):
    task = pair_task()
    a, b = tok.encode("the old river"), tok.encode("north and south")
    row, cut = finetune.encode(
        task, "encoder", tok, task.splits["train"][0], seq_len=24, target_len=4,
        template=tasks.PAIR_TEMPLATE,
    )  # fmt: skip
    n = len(a) + len(b) + 3
    assert not cut and row["targets"] == 0
    np.testing.assert_array_equal(row["inputs"][:n], [CLS, *a, SEP, *b, SEP])
    np.testing.assert_array_equal(
        row["token_type_ids"][:n], [0] * (len(a) + 2) + [1] * len(b) + [1]
    )
    assert not row["token_type_ids"][n:].any() and row["segment_ids"][:n].all()
    long = Example("l", " ".join(["stone"] * 20), "diff", pair="north")
    row, cut = finetune.encode(task, "encoder", tok, long, seq_len=8, target_len=4,
                               template="{input}")  # fmt: skip
    b = tok.encode("north")
    keep = 8 - 3 - len(b)
    assert cut and row["inputs"].tolist() == [CLS, *tok.encode(long.input)[:keep], SEP, *b, SEP]
    # A template without {text_pair} applies to the first text (head models).
    row, _ = finetune.encode(task, "encoder", tok, task.splits["train"][0], seq_len=24,
                             target_len=4, template="old {input}")  # fmt: skip
    assert row["inputs"][1 : len(a) + 2].tolist() == tok.encode("old the old river")


def test_gpt_and_t5_pair_rows(tok):
    task = pair_task()
    example = task.splits["train"][0]
    a, b = tok.encode("the old river"), tok.encode("north and south")
    gpt, _ = finetune.encode(task, "decoder", tok, example, seq_len=24, target_len=4,
                             template=tasks.PAIR_TEMPLATE)  # fmt: skip
    n = len(a) + len(b) + 3
    np.testing.assert_array_equal(gpt["inputs"][:n], [BOS, *a, SEP, *b, EOS])
    assert "token_type_ids" not in gpt
    t5, _ = finetune.encode(task, "encoder_decoder", tok, example, seq_len=40, target_len=8,
                            template=tasks.PAIR_TEMPLATE)  # fmt: skip
    text = "sentence1: the old river sentence2: north and south"
    prompt = tok.encode(text)
    np.testing.assert_array_equal(t5["encoder_inputs"][: len(prompt) + 1], [*prompt, EOS])
    with pytest.raises(KilnError, match="no '.text_pair.' placeholder"):
        finetune.encode(task, "encoder_decoder", tok, example, seq_len=40, target_len=8,
                        template="{input}")  # fmt: skip
    single = Task("one", "classification", ("x",), (), "{input}", {})
    with pytest.raises(KilnError, match="has single texts"):
        finetune.encode(single, "encoder", tok, Example("e", "a", "x"), seq_len=8, target_len=4,
                        template="{input} {text_pair}")  # fmt: skip


def test_regression_rows_batches_and_layout_errors(tok):
    task = pair_task(labels=(), kind="regression")
    example = Example("r", "the river", "2.5", pair="old stone")
    row, _ = finetune.encode(task, "encoder", tok, example, seq_len=16, target_len=4,
                             template="{input}")  # fmt: skip
    assert row["targets"].dtype == np.float32 and row["targets"] == 2.5
    lengths = dict(seq_len=16, target_len=4, template="{input}", batch_size=2)
    batches, _ = finetune.make_eval_batches(task, "decoder", tok, [example] * 3, **lengths)
    assert batches[1]["targets"].tolist() == [2.5, 0.0] and batches[1]["weights"].tolist() == [1, 0]
    with pytest.raises(KilnError, match="regression task, which needs a head"):
        finetune.check_task("r", "regression", "encoder_decoder")
    with pytest.raises(KilnError, match="Packing is only"):
        finetune.check_task("r", "regression", "decoder", pack=True)


# ----------------------------------------------------------------------- models, loss, Family

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=64, max_len=16,
    type_vocab_size=2,
)  # fmt: skip


def test_token_types_reach_bert_through_the_loss():
    model = heads.BertClassifier(CFG, num_classes=2)
    tokens = np.array([[5, 9, 12, 6, 30, 31, 6, 0]], np.int32)
    segments = (tokens != 0).astype(np.int32)
    types = np.array([[0, 0, 0, 0, 1, 1, 1, 0]], np.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, segments)["params"])
    batch = {"inputs": tokens, "segment_ids": segments, "token_type_ids": types,
             "targets": np.array([1], np.int32), "weights": np.ones(1, np.float32)}  # fmt: skip
    with_types = losses.classifier(model, params, batch, None)
    without = losses.classifier(model, params, {**batch, "token_type_ids": 0 * types}, None)
    direct = model.apply({"params": params}, tokens, segments, token_type_ids=types)
    expected = -jax.nn.log_softmax(direct)[0, 1]
    assert float(with_types["loss_sum"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(with_types["loss_sum"]) != pytest.approx(float(without["loss_sum"]))


def test_regression_loss_is_weighted_squared_error():
    model = heads.GPTClassifier(CFG, num_classes=1)
    tokens = np.array([[2, 9, 12, 3], [2, 7, 3, 0]], np.int32)
    segments = (tokens != 0).astype(np.int32)
    params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, segments)["params"])
    targets, weights = np.array([1.5, -2.0], np.float32), np.array([1.0, 0.0], np.float32)
    batch = {"inputs": tokens, "segment_ids": segments, "targets": targets, "weights": weights}
    out = losses.classifier(model, params, batch, None)  # Float targets: regression.
    values = np.asarray(model.apply({"params": params}, tokens, segments))[:, 0]
    assert float(out["loss_sum"]) == pytest.approx(float((values[0] - 1.5) ** 2), rel=1e-5)
    assert float(out["weight_sum"]) == 1.0 and float(out["correct_sum"]) == 0.0
    np.testing.assert_allclose(np.asarray(out["classes"]), values, rtol=1e-6)
    grads = jax.grad(lambda p: losses.regression(model, p, batch, None)["loss_sum"])(params)
    assert jnp.abs(grads["classifier"]["kernel"]).sum() > 0


def test_family_table_says_what_each_family_fine_tunes():
    regression = pair_task(labels=(), kind="regression")
    for name, head in (("bert", True), ("gpt", True), ("t5", False)):
        family = models.family(name)
        assert family.uses_head("regression") == head
        assert finetuning.num_classes(name, regression) == (1 if head else 0)
    with pytest.raises(KilnError, match="regression task, which needs a head"):
        models.family("t5").check_task_kind("regression", "r")
    models.family("bert").check_pairs(2, "p")
    models.family("gpt").check_pairs(0, "p")  # [SEP] alone marks the second text.
    with pytest.raises(KilnError, match=r"model.type_vocab_size=0 must be 2 for the sentence"):
        models.family("bert").check_pairs(0, "p")
