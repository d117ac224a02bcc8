"""Tests for kiln.data.tasks and kiln.data.finetune: shipped tasks, JSONL tasks, encodings."""

import hashlib
import itertools
import json
import lzma
import random

import numpy as np
import pytest

from kiln.data import corpus, finetune, tasks, user_tasks
from kiln.data.tasks import Example, Task
from kiln.data.tokenizer import Tokenizer, train_tokenizer
from kiln.errors import KilnError

SPLITS = ("train", "validation", "test")
CLS, SEP, BOS, EOS = 5, 6, 2, 3
_WORDS = (
    "the a river stone light moves over under quietly bright old new city train model data "
    "token north south sings runs café and of with"
).split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(_WORDS, k=rng.randint(low, high)))


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    rng = random.Random(1)
    docs = [sentence(rng, 3, 30) for _ in range(400)]
    return train_tokenizer(docs, tmp_path_factory.mktemp("tok") / "t.model", vocab_size=500)


def split_dict(examples: list[Example]) -> dict[str, list[Example]]:
    return {"train": examples, "validation": examples[:2], "test": examples[:2]}


@pytest.fixture(scope="module")
def gen_task() -> Task:
    rng = random.Random(2)
    examples = [Example(f"g{i}", sentence(rng, 1, 8), sentence(rng, 1, 4)) for i in range(40)]
    return Task("toy_gen", "generation", (), ("chrf",), "{input}", split_dict(examples))


@pytest.fixture(scope="module")
def cls_task() -> Task:
    rng = random.Random(3)
    labels = ("north", "river", "stone")
    examples = [Example(f"c{i}", sentence(rng, 1, 8), rng.choice(labels)) for i in range(30)]
    return Task("toy_cls", "classification", labels, ("accuracy",), "{input}", split_dict(examples))


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)


def real_length(segment_ids: np.ndarray) -> int:
    return int(np.count_nonzero(segment_ids))


def enc(task, layout, tok, example, seq_len=16, target_len=6, template="{input}"):
    """finetune.encode with short default lengths."""
    kwargs = dict(seq_len=seq_len, target_len=target_len, template=template)
    return finetune.encode(task, layout, tok, example, **kwargs)


def train(task, layout, tok, examples, seq_len=40, target_len=8, batch=4, seed=0, **kwargs):
    """finetune.make_train_dataset with short default lengths and the default template."""
    lengths = dict(seq_len=seq_len, target_len=target_len, template="{input}")
    return finetune.make_train_dataset(
        task, layout, tok, examples, **lengths, global_batch_size=batch, seed=seed, **kwargs
    )


def evaluate(task, layout, tok, examples, seq_len=16, target_len=6, batch=3):
    """finetune.make_eval_batches with short default lengths and the default template."""
    lengths = dict(seq_len=seq_len, target_len=target_len, template="{input}")
    return finetune.make_eval_batches(task, layout, tok, examples, **lengths, batch_size=batch)


# ------------------------------------------------------------------------------- shipped tasks


@pytest.mark.parametrize(
    "name, kind, classes, counts",
    [
        ("wn_lexname", "classification", 45, (94045, 11788, 11826)),
        ("wn_reverse_dictionary", "generation", 0, (94045, 11788, 11826)),
        ("bible_genre", "classification", 8, (24526, 3030, 3539)),
        ("kjv2web", "generation", 0, (24526, 3030, 3539)),
        ("code_summary", "generation", 0, (6009, 696, 869)),
        ("code_generation", "generation", 0, (6009, 696, 869)),
    ],
)
def test_shipped_task_counts(name, kind, classes, counts):
    task = tasks.load_task(name)
    assert (task.name, task.kind, len(task.labels)) == (name, kind, classes)
    assert tuple(len(task.splits[s]) for s in SPLITS) == counts
    assert list(task.labels) == sorted(task.labels)
    ids = [{e.id for e in task.splits[s]} for s in SPLITS]
    assert sum(map(len, ids)) == sum(counts), "ids are unique"
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(e.input.strip() and e.target.strip() for s in SPLITS for e in task.splits[s])
    if task.kind == "classification":
        assert {e.target for s in SPLITS for e in task.splits[s]} == set(task.labels)
    assert task.template == "{input}" and task.metrics


def test_split_keys():
    wn = tasks.load_task("wn_lexname")
    bible = tasks.load_task("bible_genre")
    for split in SPLITS:
        assert all(corpus.split_of(f"wn:{e.id}") == split for e in wn.splits[split][:500])
    with lzma.open(corpus.default_data_dir() / corpus.BIBLE_FILE, "rt", encoding="utf-8") as f:
        books = list(dict.fromkeys(line.split("\t")[0].rpartition(" ")[0] for line in f))[1:]
    assert len(books) == 66
    chapters = {}
    for split in SPLITS:
        for e in bible.splits[split]:
            book, _, verse = e.id.rpartition(" ")
            key = f"bible:{books.index(book) + 1}:{verse.partition(':')[0]}"
            assert chapters.setdefault(key, split) == split == corpus.split_of(key)
    assert len(chapters) == 1189
    # The generation tasks on the same data use the same splits.
    assert [e.id for e in tasks.load_task("kjv2web").splits["test"]] == [
        e.id for e in bible.splits["test"]
    ]


def test_wordnet_definitions_and_lemmas():
    assert tasks.definition('big; "a big house"; "another"') == "big"
    assert tasks.definition("a dog; occurs in breeds;") == "a dog; occurs in breeds"
    dog = "02084071-n"
    definition = (
        "a member of the genus Canis (probably descended from the common wolf) that has been "
        "domesticated by man since prehistoric times; occurs in many breeds"
    )
    split = corpus.split_of(f"wn:{dog}")
    (lex,) = [e for e in tasks.load_task("wn_lexname").splits[split] if e.id == dog]
    assert lex == Example(dog, definition, "noun.animal")
    (rev,) = [e for e in tasks.load_task("wn_reverse_dictionary").splits[split] if e.id == dog]
    assert rev == Example(dog, definition, "dog")


def test_bible_and_code_examples():
    genre = tasks.load_task("bible_genre").splits["train"]
    kjv2web = tasks.load_task("kjv2web").splits["train"]
    assert genre[0].id == kjv2web[0].id == "Genesis 1:1"
    assert (
        genre[0].input
        == kjv2web[0].target
        == "In the beginning God created the heavens and the earth."
    )
    assert genre[0].target == "Law"
    assert kjv2web[0].input == "In the beginning God created the heaven and the earth."
    code = tasks.load_task("code_summary").splits["train"][0]
    assert code.id == "sympy:sympy/algebras/quaternion.py:20"
    assert code.input.startswith("def _check_norm(elements, norm):\n")
    assert '"""' not in code.input and code.target == "validate if input norm is consistent"
    body = tasks.load_task("code_generation").splits["train"][0]
    assert body.id == code.id
    assert (
        body.input
        == 'def _check_norm(elements, norm):\n    """validate if input norm is consistent"""\n'
    )
    assert body.target.startswith("    if norm is not None and norm.is_number:\n")


def test_cache_returns_fresh_lists(tmp_path):
    first = tasks.load_task("code_summary")
    first.splits["train"].clear()
    again = tasks.load_task("code_summary")
    assert len(again.splits["train"]) == 6009
    assert again.splits["test"][0] is first.splits["test"][0], "parsed once"


def test_shipped_task_errors(tmp_path):
    with pytest.raises(KilnError, match="Unknown task 'nope'"):
        tasks.load_task("nope")
    with pytest.raises(KilnError, match="only for the user-file tasks"):
        tasks.load_task("wn_lexname", path="x.jsonl")
    with pytest.raises(KilnError, match="wordnet30_synsets.tsv.xz"):
        tasks.load_task("wn_lexname", data_dir=tmp_path)
    with pytest.raises(KilnError, match="reads your own file"):  # user_tasks.load_any does
        tasks.load_task("jsonl", path="x.jsonl")
    assert user_tasks.load_any("wn_lexname", data_dir="data/tiny").kind == "classification"


# --------------------------------------------------------------------------- low-resource subset


def test_low_resource_subset_nested_and_md5_ordered():
    examples = [Example(f"id{i}", f"x{i}", "a") for i in range(300)]
    md5 = lambda e: hashlib.md5(e.id.encode("utf-8")).hexdigest()
    small, large = tasks.low_resource_subset(examples, 10), tasks.low_resource_subset(examples, 50)
    assert large[:10] == small and len(large) == 50
    assert [md5(e) for e in large] == sorted(md5(e) for e in examples)[:50]
    shuffled = random.Random(0).sample(examples, len(examples))
    assert tasks.low_resource_subset(shuffled, 50) == large
    assert tasks.low_resource_subset(examples, 0) == tasks.low_resource_subset(examples, 1000)
    assert sorted(tasks.low_resource_subset(examples, -1), key=lambda e: e.id) == sorted(
        examples, key=lambda e: e.id
    )


# ------------------------------------------------------------------------------------ JSONL tasks


def write_jsonl(path, records, splits=True) -> str:
    lines = []
    for i, record in enumerate(records):
        if splits and isinstance(record, dict) and "split" not in record:
            record = {**record, "split": SPLITS[i % 3]}
        lines.append(record if isinstance(record, str) else json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_classification(tmp_path):
    records = [
        {"id": f"r{i}", "text": f"text {i}", "label": "yes" if i % 2 else "no"} for i in range(9)
    ]
    records[4]["split"] = "val"
    path = write_jsonl(tmp_path / "d.jsonl", records)
    task = user_tasks.load_any("jsonl", path=path)
    assert (task.kind, task.labels) == ("classification", ("no", "yes"))
    assert task.metrics[0] == "accuracy"
    assert [e.id for e in task.splits["train"]] == ["r0", "r3", "r6"]
    assert [e.id for e in task.splits["validation"]] == ["r1", "r4", "r7"]
    given = user_tasks.load_any("jsonl", path=path, labels=["yes", "no", "maybe"])
    assert given.labels == ("maybe", "no", "yes")


def test_jsonl_generation_ids_and_md5_splits(tmp_path):
    records = [{"input": f"question {i}", "target": f"answer {i}"} for i in range(100)]
    path = write_jsonl(tmp_path / "g.jsonl", records, splits=False)
    task = user_tasks.load_any("jsonl", path=path, kind="generation")
    assert task.kind == "generation" and task.labels == ()
    for split in SPLITS:
        for e in task.splits[split]:
            assert e.id == hashlib.md5(e.input.encode()).hexdigest()
            assert corpus.split_of(e.id) == split
    assert sum(len(v) for v in task.splits.values()) == 100


def jsonl_error(tmp_path, records, **kwargs) -> str:
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(KilnError) as info:
        user_tasks.load_any("jsonl", path=path, **kwargs)
    return str(info.value)


def test_jsonl_errors(tmp_path):
    good = [{"text": f"t{i}", "label": "a"} for i in range(6)]
    message = jsonl_error(tmp_path, [*good[:4], '{"text": "x", "label": ', *good[4:]])
    assert "bad.jsonl, line 5: not valid JSON" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x", "label": "c"}], labels=["a", "b"])
    assert "line 7: label 'c' is not in the given label set: 'a', 'b'" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x", "label": "  "}])
    assert "line 7" in message and "empty" in message
    message = jsonl_error(tmp_path, [{"input": "x", "target": ""}])
    assert "line 1" in message and "'target' field is empty" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x", "label": 3}])
    assert "line 7: the 'label' field is not a string" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x"}])
    assert "line 7: the 'label' field is missing" in message
    message = jsonl_error(tmp_path, [*good, {"input": "x", "target": "y"}])
    assert "line 7: uses 'input'/'target' but line 1 uses 'text'/'label'" in message
    message = jsonl_error(tmp_path, good, kind="generation")
    assert "line 1: a generation task needs 'input' and 'target'" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x", "label": "b", "split": "test"}])
    assert "line 7: label 'b' is not in the train split's labels" in message
    message = jsonl_error(tmp_path, [{**r, "split": "train"} for r in good])
    assert "no validation examples" in message and "'split' field" in message
    message = jsonl_error(tmp_path, [*good, {"text": "x", "label": "a", "split": "dev"}])
    assert "line 7: unknown split 'dev'" in message
    with pytest.raises(KilnError, match="needs the path"):
        user_tasks.load_any("jsonl")
    with pytest.raises(KilnError, match="not found"):
        user_tasks.load_any("jsonl", path=tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------- encoding


def test_gpt_generation_prompt_masking(tok, gen_task):
    example = Example("e", "the river", "old stone")
    row, cut = enc(
        gen_task, "decoder", tok, example, seq_len=32, target_len=8, template="Q: {input}"
    )
    prompt, target = ids_of(tok, "Q: the river"), ids_of(tok, "old stone")
    tokens = [BOS, *prompt, SEP, *target, EOS]
    n = len(tokens)
    assert not cut
    np.testing.assert_array_equal(row["inputs"], tokens + [0] * (32 - n))
    np.testing.assert_array_equal(row["targets"], tokens[1:] + [0] * (33 - n))
    expected = np.zeros(32, np.float32)
    expected[len(prompt) + 1 : n - 1] = 1  # From the [SEP] (predicts target[0]) to eos.
    np.testing.assert_array_equal(row["weights"], expected)
    assert row["weights"].sum() == len(target) + 1
    np.testing.assert_array_equal(row["segment_ids"], [1] * n + [0] * (32 - n))
    np.testing.assert_array_equal(row["positions"], list(range(n)) + [0] * (32 - n))
    assert {k: v.dtype for k, v in row.items()} == {
        "inputs": np.int32,
        "targets": np.int32,
        "weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    # Decoding starts from the same prompt, ending with the [SEP].
    decode = finetune.generation_prompt(
        gen_task, "decoder", tok, example, seq_len=32, max_new_tokens=8, template="Q: {input}"
    )
    assert decode == [BOS, *prompt, SEP]


def test_gpt_generation_truncation(tok, gen_task):
    long_prompt = " ".join(["river"] * 40)
    long_target = " ".join(["stone light"] * 10)
    row, cut = enc(gen_task, "decoder", tok, Example("p", long_prompt, "old"))
    target = ids_of(tok, "old")
    assert cut and row["inputs"][-1] == EOS and row["segment_ids"].all()
    budget = 16 - 3 - len(target)
    np.testing.assert_array_equal(
        row["inputs"], [BOS, *ids_of(tok, long_prompt)[:budget], SEP, *target, EOS]
    )
    row, cut = enc(gen_task, "decoder", tok, Example("t", "a", long_target))
    expected = [BOS, *ids_of(tok, "a"), SEP, *ids_of(tok, long_target)[:5], EOS]
    assert cut and row["weights"].sum() == 6
    np.testing.assert_array_equal(row["inputs"][: len(expected)], expected)
    # Truncations are counted, never silent.
    examples = [
        Example("a", "a", "b"),
        Example("p", long_prompt, "old"),
        Example("t", "a", long_target),
    ]
    _, truncated = evaluate(gen_task, "decoder", tok, examples, batch=2)
    assert truncated == 2
    _, truncated = train(gen_task, "decoder", tok, examples, seq_len=16, target_len=6, batch=2)
    assert truncated == 2


def test_classification_encodings(tok, cls_task):
    example = Example("e", "the old city", "river")
    prompt = ids_of(tok, "the old city")
    bert, cut = enc(cls_task, "encoder", tok, example, seq_len=12)
    assert not cut
    np.testing.assert_array_equal(bert["inputs"][: len(prompt) + 2], [CLS, *prompt, SEP])
    assert real_length(bert["segment_ids"]) == len(prompt) + 2
    assert bert["targets"].shape == () and bert["targets"] == 1  # sorted: north, river, stone
    assert bert["weights"].shape == () and bert["weights"] == 1.0
    gpt, _ = enc(cls_task, "decoder", tok, example, seq_len=12)
    last = real_length(gpt["segment_ids"]) - 1
    assert gpt["inputs"][0] == BOS and gpt["inputs"][last] == EOS and gpt["targets"] == 1
    np.testing.assert_array_equal(gpt["positions"][: last + 1], np.arange(last + 1))
    # A long prompt is cut so that the final special token stays.
    long = Example("l", " ".join(["stone"] * 30), "north")
    for layout, end in (("encoder", SEP), ("decoder", EOS)):
        row, cut = enc(cls_task, layout, tok, long, seq_len=12)
        assert cut and row["inputs"][-1] == end and row["segment_ids"].all() and row["targets"] == 0


def test_t5_encodings(tok, cls_task, gen_task):
    example = Example("e", "the old city", "stone")
    row, cut = enc(cls_task, "encoder_decoder", tok, example, seq_len=12, target_len=4)
    label = ids_of(tok, "stone")
    prompt = ids_of(tok, "the old city")
    assert not cut
    np.testing.assert_array_equal(row["encoder_inputs"][: len(prompt) + 1], [*prompt, EOS])
    assert real_length(row["encoder_segment_ids"]) == len(prompt) + 1
    n = len(label) + 1
    np.testing.assert_array_equal(row["decoder_inputs"], [BOS, *label] + [0] * (4 - n))
    np.testing.assert_array_equal(row["targets"], [*label, EOS] + [0] * (4 - n))
    np.testing.assert_array_equal(row["weights"], [1] * n + [0] * (4 - n))
    np.testing.assert_array_equal(row["decoder_positions"], list(range(n)) + [0] * (4 - n))
    assert finetune.generation_prompt(
        cls_task, "encoder_decoder", tok, example, seq_len=12, max_new_tokens=4, template="{input}"
    ) == [*prompt, EOS]
    long = Example("l", " ".join(["stone"] * 30), " ".join(["river"] * 30))
    row, cut = enc(gen_task, "encoder_decoder", tok, long, seq_len=12, target_len=4)
    assert cut and row["encoder_inputs"][-1] == EOS and row["targets"][-1] == EOS
    assert row["weights"].all()
    wordy = Task("w", "classification", ("stone river city",), (), "{input}", {})
    need = len(ids_of(tok, "stone river city")) + 1
    with pytest.raises(KilnError, match=f"Raise target_len to at least {need}"):
        enc(
            wordy,
            "encoder_decoder",
            tok,
            Example("x", "a", "stone river city"),
            target_len=need - 1,
        )


def test_encoding_errors(tok, cls_task, gen_task):
    example = gen_task.splits["train"][0]
    with pytest.raises(KilnError, match="encoder .bert. cannot"):
        enc(gen_task, "encoder", tok, example)
    with pytest.raises(KilnError, match="Unknown model layout"):
        enc(gen_task, "rnn", tok, example)
    with pytest.raises(KilnError, match="placeholder"):
        enc(gen_task, "decoder", tok, example, template="no input")
    with pytest.raises(KilnError, match="too small"):
        enc(gen_task, "decoder", tok, example, seq_len=6, target_len=4)
    with pytest.raises(KilnError, match="not among the task's labels"):
        enc(cls_task, "encoder", tok, Example("x", "a", "zzz"))
    with pytest.raises(KilnError, match="generates nothing"):
        finetune.generation_prompt(
            cls_task, "decoder", tok, example, seq_len=16, max_new_tokens=4, template="{input}"
        )
    with pytest.raises(KilnError, match="Packing is only"):
        train(cls_task, "encoder", tok, cls_task.splits["train"], pack=True)
    with pytest.raises(KilnError, match="No training examples"):
        train(gen_task, "decoder", tok, [])


# ------------------------------------------------------------------------------------- datasets


def take(ds_or_iter, n: int) -> list[dict]:
    return list(itertools.islice(ds_or_iter, n))


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def unpadded(tok, task, example, seq_len, target_len) -> tuple:
    row, _ = enc(task, "decoder", tok, example, seq_len, target_len)
    n = real_length(row["segment_ids"])
    return tuple(row["inputs"][:n]), tuple(row["targets"][:n]), tuple(row["weights"][:n])


def test_check_task_before_the_kind_is_known():
    """`validation.validate` checks a task whose kind is not known yet (kind "")."""
    finetune.check_task("wn_lexname", "", "encoder")
    finetune.check_task("kjv2web", "", "decoder", pack=True)
    finetune.check_task("kjv2web", "generation", "decoder", pack=True)
    with pytest.raises(KilnError, match=r"task\.pack=True"):
        finetune.check_task("wn_lexname", "", "encoder_decoder", pack=True)
    with pytest.raises(KilnError, match=r"task\.pack=True"):
        finetune.check_task("wn_lexname", "classification", "decoder", pack=True)
    with pytest.raises(KilnError, match=r"task\.name='kjv2web'.*encoder .bert. cannot"):
        finetune.check_task("kjv2web", "generation", "encoder")


def test_packing_keeps_examples_whole_and_masks_prompts(tok, gen_task):
    examples = gen_task.splits["train"]
    ds, _ = train(gen_task, "decoder", tok, examples, seq_len=48, target_len=8, seed=1, pack=True)
    expected = {unpadded(tok, gen_task, e, 48, 8) for e in examples}
    seen, per_row = [], []
    for batch in take(ds, 10):
        assert batch["inputs"].shape == (4, 48)
        for b in range(4):
            seg, pos = batch["segment_ids"][b], batch["positions"][b]
            real = real_length(seg)
            assert np.all(seg[real:] == 0) and np.all(batch["weights"][b][real:] == 0)
            per_row.append(seg.max())
            for s in range(1, seg.max() + 1):
                (where,) = np.nonzero(seg == s)
                assert where[0] == 0 or seg[where[0] - 1] == s - 1, "segments are contiguous"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                piece = tuple(tuple(batch[k][b][where]) for k in ("inputs", "targets", "weights"))
                assert piece in expected, "a whole example, encoded as when unpacked"
                inputs, weights = batch["inputs"][b][where], batch["weights"][b][where]
                sep = list(inputs).index(SEP)
                assert weights[:sep].sum() == 0, "no loss on prompt tokens"
                assert weights[sep:-1].all() and weights[-1] == 0
                seen.append(piece)
    assert max(per_row) > 1, "rows hold several examples"
    assert len(set(seen)) == len(expected), "every example appears"


def test_train_stream_epochs_and_process_slices(tok, cls_task):
    examples = cls_task.splits["train"]
    ds, _ = train(cls_task, "encoder", tok, examples, seq_len=16, batch=6, seed=5)
    batches = take(ds, 10)  # Two epochs of 30 examples.
    assert batches[0]["targets"].shape == (6,) and batches[0]["inputs"].shape == (6, 16)
    rows = np.concatenate([b["inputs"] for b in batches])
    by_example = {
        tuple(enc(cls_task, "encoder", tok, e)[0]["inputs"]): i for i, e in enumerate(examples)
    }
    order = [by_example[tuple(r)] for r in rows]
    assert sorted(order[:30]) == sorted(order[30:]) == sorted(by_example.values())
    assert order[:30] != order[30:], "reshuffled every epoch"
    slices = dict(seq_len=16, batch=6, seed=5, process_count=2)
    halves = [
        take(train(cls_task, "encoder", tok, examples, **slices, process_index=i)[0], 3)
        for i in range(2)
    ]
    for whole, a, b in zip(batches, *halves):
        for k in whole:
            np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))


@pytest.mark.parametrize("pack", [False, True])
def test_iterator_resume(tok, gen_task, pack):
    ds, _ = train(gen_task, "decoder", tok, gen_task.splits["train"], batch=3, seed=7, pack=pack)
    it = iter(ds)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # As grain.checkpoint stores it.
    expected = take(it, 2)
    restored = iter(ds)
    restored.set_state(state)
    assert_batches_equal(take(restored, 2), expected)


def test_eval_batches(tok, cls_task, gen_task):
    examples = cls_task.splits["train"][:7]
    batches, truncated = evaluate(cls_task, "decoder", tok, examples)
    assert len(batches) == 3 and truncated == 0
    assert [b["weights"].tolist() for b in batches] == [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
    labels = [cls_task.labels.index(e.target) for e in examples]
    assert np.concatenate([b["targets"] for b in batches])[:7].tolist() == labels
    assert not batches[-1]["inputs"][1:].any() and not batches[-1]["segment_ids"][1:].any()
    for i, e in enumerate(examples):
        row, _ = enc(cls_task, "decoder", tok, e)
        np.testing.assert_array_equal(batches[i // 3]["inputs"][i % 3], row["inputs"])
    t5, _ = evaluate(gen_task, "encoder_decoder", tok, gen_task.splits["train"][:5], batch=4)
    assert t5[1]["encoder_inputs"].shape == (4, 16) and t5[1]["targets"].shape == (4, 6)
    assert t5[1]["weights"][0].any() and not t5[1]["weights"][1:].any()
    assert evaluate(gen_task, "encoder_decoder", tok, []) == ([], 0)
