"""Parity checks of an imported causal LM (GPT-2, Llama) against the transformers model it came
from: logits on unpadded, padded and packed inputs, and greedy decoding with the KV cache."""

import jax
import numpy as np
import torch
import transformers

from kiln import decoding, models
from kiln.hf.checkpoints import Imported

TOL = 1e-4  # Max abs logit difference allowed (float32).
VOCAB = 1001  # A multiple of nothing, like GPT-2's 50257.
BOS, EOS = 1, 2


def load_hf(path: str) -> torch.nn.Module:
    """The transformers model saved in `path`, float32, eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def kiln_logits(imported: Imported, tokens, segment_ids=None, positions=None) -> np.ndarray:
    model = models.build_model(imported.model)
    args = [np.asarray(x) if x is not None else None for x in (tokens, segment_ids, positions)]
    return np.asarray(model.apply({"params": imported.params}, *args))


def hf_logits(hf_model: torch.nn.Module, tokens, mask=None, positions=None) -> np.ndarray:
    as_tensor = lambda x: None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)
    with torch.no_grad():
        out = hf_model(
            input_ids=as_tensor(tokens),
            attention_mask=as_tensor(mask),
            position_ids=as_tensor(positions),
        )
    return out.logits.numpy()


def unpadded_diff(imported: Imported, hf_model: torch.nn.Module, vocab: int) -> float:
    tokens = np.random.RandomState(0).randint(0, vocab, (2, 16))
    return float(np.abs(kiln_logits(imported, tokens) - hf_logits(hf_model, tokens)).max())


def padded_diff(imported: Imported, hf_model: torch.nn.Module, vocab: int) -> float:
    """Right- and left-padded rows (HF attention_mask and position ids; kiln segment ids 0 and
    positions from 0 per row), compared at the real tokens."""
    rng = np.random.RandomState(1)
    tokens = rng.randint(0, vocab, (2, 12))
    lengths = np.array([12, 7])
    right = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int32)
    left = right[:, ::-1].copy()
    worst = 0.0
    for mask in (right, left):
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
        ours = kiln_logits(imported, tokens, mask, positions)
        theirs = hf_logits(hf_model, tokens, mask, positions)
        real = mask.astype(bool)
        worst = max(worst, float(np.abs(ours[real] - theirs[real]).max()))
    return worst


def packed_diff(imported: Imported, hf_model: torch.nn.Module, vocab: int) -> float:
    """Two documents packed in one kiln row against each alone in HF."""
    rng = np.random.RandomState(2)
    a, b = rng.randint(0, vocab, 9), rng.randint(0, vocab, 6)
    row = np.concatenate([a, b])[None]
    segment_ids = np.array([[1] * len(a) + [2] * len(b)])
    positions = np.concatenate([np.arange(len(a)), np.arange(len(b))])[None]
    packed = kiln_logits(imported, row, segment_ids, positions)[0]
    alone = np.concatenate([hf_logits(hf_model, a[None])[0], hf_logits(hf_model, b[None])[0]])
    return float(np.abs(packed - alone).max())


def greedy_tokens(
    imported: Imported, hf_model: torch.nn.Module, vocab: int, eos: int, bos: int
) -> tuple[list[list[int]], list[list[int]]]:
    """(kiln's, HF's) greedy continuations of prompts of different lengths (kiln decodes them
    as one left-padded batch with its KV cache; HF one by one), cut before eos."""
    rng = np.random.RandomState(3)
    prompts = [[bos, *rng.randint(3, vocab, n).tolist()] for n in (4, 11, 1)]
    model = models.build_model(imported.model)
    params = jax.tree.map(np.asarray, imported.params)
    options = decoding.DecodeOptions(max_new_tokens=10)
    ours = decoding.generate(model, params, prompts, options, eos_id=eos, bos_id=bos)
    theirs = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=10,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        new = out[0, len(prompt) :].tolist()
        theirs.append(new[: new.index(eos)] if eos in new else new)
    return ours, theirs
