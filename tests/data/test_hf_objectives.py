"""Objectives, packing and task rows with Hugging Face tokenizers: the special roles come from
the tokenizer (BERT has no bos/eos, GPT-2 no [SEP]), never from kiln's fixed layout. Checked
against transformers' own view of the same tokenizer files."""

import numpy as np
import transformers

from kiln.data import finetune, objectives, pipeline, tasks
from kiln.data.tokenizer import load_tokenizer


def _packed(tok, lines: list[str], rows: int, row_len: int) -> dict:
    docs = pipeline.Tokenized(lines, tok)
    return docs.pack(np.arange(len(docs)), np.arange(rows), row_len)


def test_bert_documents_pack_between_cls_and_sep(bert_dir, lines):
    tok, reference = load_tokenizer(bert_dir), transformers.AutoTokenizer.from_pretrained(bert_dir)
    docs = pipeline.Tokenized(lines[:20], tok)
    for d in range(len(docs)):
        doc = docs.tokens[docs.starts[d] : docs.starts[d + 1]].tolist()
        body = reference(lines[d], add_special_tokens=False).input_ids
        assert doc == [reference.cls_token_id, *body, reference.sep_token_id]


def test_bert_masked_lm_masks_ordinary_wordpieces_only(bert_dir, lines):
    tok, reference = load_tokenizer(bert_dir), transformers.AutoTokenizer.from_pretrained(bert_dir)
    objective = objectives.make_objective("mlm", objectives.Layout.ENCODER, tok, 64, mask_rate=0.3)
    batch = _packed(tok, lines[:200], rows=32, row_len=64)
    out = objective(batch, np.random.default_rng(0))
    special = set(reference.all_special_ids)
    targets = out["targets"][out["weights"] > 0]
    assert targets.size > 100 and not special & set(targets.tolist())
    # kiln's own layout reserves ids below 107; a WordPiece vocabulary has ordinary tokens there.
    assert (targets < 107).any()
    changed = out["inputs"] != batch["tokens"]
    replaced = out["inputs"][changed & (out["inputs"] != reference.mask_token_id)]
    assert replaced.size and not special & set(replaced.tolist())


def test_bert_whole_word_masking_keeps_wordpiece_words_whole(bert_dir, lines):
    tok, reference = load_tokenizer(bert_dir), transformers.AutoTokenizer.from_pretrained(bert_dir)
    objective = objectives.make_objective(
        "mlm", objectives.Layout.ENCODER, tok, 64, mask_rate=0.3, whole_word=True
    )
    batch = _packed(tok, lines[:200], rows=32, row_len=64)
    out = objective(batch, np.random.default_rng(1))
    pieces = np.array(reference.convert_ids_to_tokens(range(len(reference))), dtype=object)
    tokens, selected = batch["tokens"], out["weights"] > 0
    continues = np.vectorize(lambda p: p.startswith("##"))(pieces[tokens])
    same_segment = batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    inside = continues[:, 1:] & same_segment  # a "##" piece of the word before it
    assert inside.sum() > 20 and selected.sum() > 20
    assert (selected[:, 1:][inside] == selected[:, :-1][inside]).all()


def test_gpt2_completion_rows_separate_prompt_and_answer_with_eos(gpt2_dir):
    tok, reference = load_tokenizer(gpt2_dir), transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    assert tok.sep_id is None
    task = tasks.Task("t", "generation", (), ("chrf",), "{input}", {})
    example = tasks.Example("0", "In the beginning", "God created")
    prompt = finetune.generation_prompt(
        task,
        objectives.Layout.DECODER,
        tok,
        example,
        seq_len=32,
        max_new_tokens=8,
        template="{input}",
    )
    body = reference("In the beginning", add_special_tokens=False).input_ids
    eos = reference.eos_token_id
    assert prompt == [eos, *body, eos]  # GPT-2's bos is its eos, <|endoftext|>
