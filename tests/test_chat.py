"""Chat data (`kiln.data.chat`): the loss mask against an independent construction, packing,
bad input, the family check, and a tiny packed SFT run whose token count is the assistant's."""

import json

import ml_collections
import numpy as np
import pytest

from kiln import arms, finetuning, run
from kiln.data import chat, corpus, finetune, packing, tasks, user_tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.errors import KilnError
from test_task_formats_run import _WORDS, _pretrain

TURNS = (
    ("system", "Answer in one word."),
    ("user", "What covers the ground in winter?"),
    ("assistant", "Snow."),
    ("user", "And in the sky at night?"),
    ("assistant", "The moon and the stars"),
    ("user", "Thanks"),
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    docs = corpus.read_documents("bible,wordnet", "train", data_dir="data/tiny")[:300]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    tokenizer_lib.train_tokenizer(docs, path, vocab_size=512, model_type="bpe", seed=0)
    return tokenizer_lib.load_tokenizer(path)


def _example(turns=TURNS, example_id="c0") -> chat.ChatExample:
    return chat.ChatExample(example_id, "", "", messages=tuple(turns))


@pytest.mark.parametrize("template", [chat.DEFAULT_TEMPLATE, "<|{role}|>\n{content}\n\n"])
def test_loss_mask_covers_exactly_the_assistant_tokens(tok, template):
    (row,), cut = chat.rows(tok, [_example()], template, seq_len=512)
    assert cut == 0
    inputs, targets, weights = row["inputs"], row["targets"], row["weights"]
    np.testing.assert_array_equal(targets[:-1], inputs[1:])
    # Independent: each assistant turn tokenized on its own, plus eos, must be the targets of
    # one run of weighted positions, and the text before the run is the conversation so far
    # up to the assistant's cue.
    weighted = np.flatnonzero(weights)
    runs = np.split(weighted, np.flatnonzero(np.diff(weighted) > 1) + 1)
    assistant = [i for i, (role, _) in enumerate(TURNS) if role == "assistant"]
    assert len(runs) == len(assistant)
    for positions, i in zip(runs, assistant):
        expected = [*tok.encode(TURNS[i][1]), tok.eos_id]
        assert targets[positions].tolist() == expected
        before = "".join(template.format(role=r, content=c) for r, c in TURNS[:i])
        cue = template.split("{content}")[0].format(role="assistant")
        assert tok.decode(inputs[1 : positions[0] + 1]) == before + cue
    assert weights.sum() == sum(len(tok.encode(TURNS[i][1])) + 1 for i in assistant)
    assert set(np.unique(weights)) <= {0.0, 1.0}


def test_rows_are_cut_at_seq_len_and_prompt_ends_at_the_cue(tok):
    (full,), _ = chat.rows(tok, [_example()], chat.DEFAULT_TEMPLATE, seq_len=512)
    (short,), cut = chat.rows(tok, [_example()], chat.DEFAULT_TEMPLATE, seq_len=20)
    assert cut == 1 and len(short["inputs"]) == 20
    np.testing.assert_array_equal(short["weights"][:-1], full["weights"][:19])
    ids = chat.prompt(tok, _example(), chat.DEFAULT_TEMPLATE, seq_len=512, max_new_tokens=8)
    history = "".join(chat.DEFAULT_TEMPLATE.format(role=r, content=c) for r, c in TURNS[:4])
    assert ids[0] == tok.bos_id and tok.decode(ids[1:]) == history + "assistant: "
    cut_ids = chat.prompt(tok, _example(), chat.DEFAULT_TEMPLATE, seq_len=30, max_new_tokens=8)
    assert len(cut_ids) == 22 and cut_ids[0] == tok.bos_id and cut_ids[1:] == ids[-21:]


def test_packing_keeps_each_conversations_mask(tok):
    turns = [(("user", w), ("assistant", w), ("user", "more"), ("assistant", w)) for w in _WORDS]
    examples = [_example(t, f"c{i}") for i, t in enumerate(turns)]
    alone, _ = chat.rows(tok, examples, chat.DEFAULT_TEMPLATE, seq_len=128)
    task = _task_of(examples)
    dataset, _ = finetune.make_train_dataset(
        task, Layout.DECODER, tok, examples, seq_len=128, target_len=8,
        template=chat.DEFAULT_TEMPLATE, global_batch_size=4, seed=0, pack=True,
    )  # fmt: skip
    batch = next(iter(dataset))
    by_inputs = {r["inputs"].tobytes(): r for r in alone}
    segments = 0
    for row in range(4):
        ids = batch["segment_ids"][row]
        for segment in range(1, ids.max() + 1):
            where = ids == segment
            original = by_inputs[batch["inputs"][row][where].tobytes()]
            np.testing.assert_array_equal(batch["weights"][row][where], original["weights"])
            np.testing.assert_array_equal(batch["targets"][row][where], original["targets"])
            segments += 1
        assert batch["weights"][row][ids == 0].sum() == 0
    assert segments > 4  # Rows hold several conversations.
    packed = packing.pack(alone[:2], 128)
    assert packed["weights"].sum() == alone[0]["weights"].sum() + alone[1]["weights"].sum()


def _task_of(examples):
    splits = {"train": list(examples), "validation": [], "test": []}
    return tasks.Task("chat", chat.KIND, (), ("chrf",), chat.DEFAULT_TEMPLATE, splits)


def _write(path, lines):
    path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
    return str(path)


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


@pytest.mark.parametrize(
    "bad, expected",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "role 'bot'"),
        ({"text": "hi"}, "has no 'messages'"),
        ({"messages": []}, "empty or non-list 'messages'"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}, "'content'"),
        ({"messages": [{"role": "assistant", "content": " "}]}, "empty 'content'"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, bad, expected):
    path = _write(tmp_path / "bad.jsonl", [GOOD, bad])
    with pytest.raises(KilnError, match=expected) as error:
        user_tasks.load_any("chat", path=path)
    assert f"{path}, line 2" in str(error.value)


def test_detection_templates_and_options(tmp_path):
    lines = [dict(GOOD, id=f"x{i}", split=("train", "validation", "test")[i % 3]) for i in range(9)]
    path = _write(tmp_path / "chat.jsonl", lines)
    for name, kind in (("jsonl", ""), ("jsonl", "chat"), ("chat", "")):
        task = user_tasks.load_any(name, path=path, kind=kind)
        assert task.kind == chat.KIND and task.template == chat.DEFAULT_TEMPLATE
        assert [e.target for e in task.splits["test"]] == ["yo"] * 3
    with pytest.raises(KilnError, match="takes no labels"):
        user_tasks.load_any("chat", path=path, labels=("a",))
    for template in ("{role}: {input}", "{content}", "{role} {content} {content}"):
        with pytest.raises(KilnError, match="task.template"):
            chat.check_template(template)
    with pytest.raises(KilnError, match="task.path"):
        user_tasks.load_any("chat", path="")


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_encoder_and_encoder_decoder_families_are_refused(tmp_path, family):
    lines = [dict(GOOD, id=f"x{i}", split=("train", "validation", "test")[i % 3]) for i in range(3)]
    task = user_tasks.load_any("chat", path=_write(tmp_path / "c.jsonl", lines))
    with pytest.raises(KilnError, match="needs a decoder"):
        finetuning.check_model(ml_collections.ConfigDict({"family": family}), task)
    with pytest.raises(KilnError, match="chat task"):
        finetune.check_task("chat", "", Layout.ENCODER_DECODER)


@pytest.mark.slow
def test_packed_sft_run_trains_on_assistant_tokens_only(tmp_path):
    source = str(tmp_path / "pretrain")
    pretrain = _pretrain("gpt", source)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(60):
        a, b = rng.choice(_WORDS, 2)
        messages = [{"role": "user", "content": f"{a} {b}"}, {"role": "assistant", "content": b}]
        lines.append({"id": f"c{i}", "messages": messages})
    path = _write(tmp_path / "chat.jsonl", lines)
    config = arms.finetune_stage(
        pretrain, task="chat", train_examples=0, epochs=1.0, lr=1e-3, seq_len=32, batch=8,
        init_from=source,
    )  # fmt: skip
    config.tokenizer.path = source
    config.task.path, config.task.pack, config.task.target_len = path, True, 4
    config.task.metrics = "exact_match,chrf"
    summary = run.train_and_evaluate(config, str(tmp_path / "sft"))
    assert summary["step"] == config.train.steps > 0
    # The validation loss is over the assistant tokens (each reply and its eos), nothing else.
    tok = tokenizer_lib.load_tokenizer(f"{source}/tokenizer.model")
    task = user_tasks.load_any("chat", path=path)
    expected = 0
    for example in task.splits["validation"]:
        ids, _ = chat.encode(tok, example.messages, chat.DEFAULT_TEMPLATE)
        assert len(ids) <= 32  # Nothing is cut: every assistant token counts.
        expected += sum(len(tok.encode(c)) + 1 for r, c in example.messages if r == "assistant")
    assert summary["validation/tokens"] == expected
    assert 0.0 <= summary["test/exact_match"] <= 100.0 and 0.0 <= summary["test/chrf"] <= 100.0
    rows = [json.loads(x) for x in open(tmp_path / "sft" / "predictions_test.jsonl")]
    assert [r["target"] for r in rows] == [e.target for e in task.splits["test"]]
