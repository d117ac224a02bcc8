"""Zero- and k-shot prompting: how a pre-trained-only model (or an imported one) is measured on a
labeled task without training. The prompts are built by `kiln.prompts` (templates,
demonstrations, budget; its names are re-exported here); this module scores them.

Scoring (`Options.scoring`):
  generate  greedy decoding through `decoding.generate` (gpt: `bos prompt`, t5: `prompt eos`),
            the text cut at the first blank line and stripped, then the task's metrics.
  rank      classification: each label word is a candidate; its score is the total
            log-probability of its tokens given the prompt (gpt: the tokens of `join + word`
            after `bos prompt`; t5: the decoder's `word eos`), from one batched forward pass over
            the candidate set; with `normalize`, divided by its token count. The best wins.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kiln import decoding, models, task_metrics
from kiln.data import tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.errors import KilnError
from kiln.prompts import (  # noqa: F401 (re-exported: prompting's public names)
    DEFAULT_TEMPLATE,
    PAIR_TEMPLATE,
    SCORINGS,
    SEPARATOR,
    TEMPLATES,
    Options,
    Prompt,
    Template,
    answer,
    build_prompt,
    choose_demonstrations,
    label_words,
    prompts_for,
    query_text,
    template_for,
)

LENGTH_BUCKET = 16


def _bucket(n: int) -> int:
    return -(-n // LENGTH_BUCKET) * LENGTH_BUCKET


def _pad(rows: Sequence[Sequence[int]], width: int) -> np.ndarray:
    out = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


@functools.lru_cache(maxsize=8)
def _token_logprobs_fn(model: Any) -> Callable:
    """jit(params, batch, targets, weights) -> per-row sums of weight * log p(target)."""

    def fn(params: Any, batch: dict, targets: jax.Array, weights: jax.Array) -> jax.Array:
        logits = model.apply({"params": params}, **batch)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return jnp.sum(picked * weights, axis=-1)

    return jax.jit(fn)


def candidate_batch(
    layout: Layout,
    tok: tokenizer_lib.AnyTokenizer,
    prompt_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(model inputs, targets, weights) of one row per candidate: weights are 1 exactly where
    a target is a candidate token (t5: and its eos), so a row's weighted sum of target
    log-probabilities is the candidate's total log-probability given the prompt."""
    if layout == Layout.ENCODER_DECODER:
        encoder = [*prompt_ids, tok.eos_id]
        width = _bucket(max(len(c) for c in candidates) + 1)
        decoder_in = [[tok.bos_id, *c] for c in candidates]
        targets = [[*c, tok.eos_id] for c in candidates]
        segments = _pad([[1] * len(t) for t in targets], width)
        enc_width = _bucket(len(encoder))
        batch = {
            "encoder_inputs": _pad([encoder] * len(candidates), enc_width),
            "decoder_inputs": _pad(decoder_in, width),
            "encoder_segment_ids": _pad([[1] * len(encoder)] * len(candidates), enc_width),
            "decoder_segment_ids": segments,
        }
        return batch, _pad(targets, width), segments.astype(np.float32)
    start = 1 + len(prompt_ids)  # bos prompt: the first candidate token is predicted at start - 1
    rows = [[tok.bos_id, *prompt_ids, *c] for c in candidates]
    width = _bucket(max(len(r) for r in rows))
    inputs = _pad(rows, width)
    targets = np.zeros_like(inputs)
    targets[:, :-1] = inputs[:, 1:]
    weights = np.zeros(inputs.shape, np.float32)
    for i, c in enumerate(candidates):
        weights[i, start - 1 : start - 1 + len(c)] = 1.0
    segments = _pad([[1] * len(r) for r in rows], width)
    positions = np.where(segments > 0, np.arange(width)[None, :], 0).astype(np.int32)
    return {"inputs": inputs, "segment_ids": segments, "positions": positions}, targets, weights


def candidate_logprobs(
    model: Any,
    params: Any,
    tok: tokenizer_lib.AnyTokenizer,
    prompt_ids: Sequence[int],
    candidates: Sequence[Sequence[int]],
    normalize: bool = False,
) -> np.ndarray:
    """Each candidate's total log-probability given the prompt (`normalize`: per token), from
    one forward pass over the candidate set (`candidate_batch`)."""
    layout = models.family_of(model).layout
    batch, targets, weights = candidate_batch(layout, tok, prompt_ids, candidates)
    sums = np.asarray(_token_logprobs_fn(model)(params, batch, targets, weights), np.float64)
    return sums / weights.sum(axis=1) if normalize else sums


def rank(
    model: Any,
    params: Any,
    task: tasks.Task,
    tok: tokenizer_lib.AnyTokenizer,
    prompts: Sequence[Prompt],
    options: Options,
) -> tuple[list[str], list[dict[str, float]]]:
    """Each prompt's best label by candidate log-probability, and every label's score."""
    if task.kind != "classification":
        raise KilnError(
            f"scoring='rank' ranks label words, and task {task.name!r} is a {task.kind} task:"
            " use scoring='generate' (or a fine-tuned head for regression)."
        )
    words = label_words(task, options.label_words)
    layout = models.family_of(model).layout
    join = "" if layout == Layout.ENCODER_DECODER else template_for(task, options.template).join
    candidates = [tok.encode(join + words[label]) for label in task.labels]
    if any(not c for c in candidates):
        raise KilnError(
            f"A label word of task {task.name!r} encodes to no tokens: set label_words."
        )
    predictions, scores = [], []
    for prompt in prompts:
        values = candidate_logprobs(model, params, tok, prompt.ids, candidates, options.normalize)
        predictions.append(task.labels[int(np.argmax(values))])
        scores.append({label: float(v) for label, v in zip(task.labels, values)})
    return predictions, scores


def generate(
    model: Any,
    params: Any,
    task: tasks.Task,
    tok: tokenizer_lib.AnyTokenizer,
    prompts: Sequence[Prompt],
    options: Options,
    mesh: jax.sharding.Mesh | None = None,
) -> list[str]:
    """Greedy continuations of the prompts, cut at the first blank line; a classification
    answer that is a label's word becomes that label."""
    family = models.family_of(model)
    if not family.generates:
        raise KilnError(
            f"A {family.name} model does not generate text: prompting needs a decoder (gpt) or"
            " encoder-decoder (t5); score a bert model with a fine-tuned head."
        )
    if family.layout == Layout.ENCODER_DECODER:
        ids = [[*p.ids, tok.eos_id] for p in prompts]
    else:
        ids = [[tok.bos_id, *p.ids] for p in prompts]
    generated = decoding.generate(
        model,
        params,
        ids,
        decoding.DecodeOptions(max_new_tokens=options.max_new_tokens),
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        batch_size=options.batch_size,
        mesh=mesh,
    )
    texts = [tok.decode(row).split(SEPARATOR)[0].strip() for row in generated]
    if task.kind == "classification":
        by_word = {w: label for label, w in label_words(task, options.label_words).items()}
        texts = [by_word.get(t, t) for t in texts]
    return texts


def budget(layout: Layout, task: tasks.Task, options: Options) -> int:
    """Prompt tokens allowed: gpt leaves room for bos and the answer, t5 for the eos."""
    if layout == Layout.ENCODER_DECODER:
        return options.seq_len - 1
    return options.seq_len - 1 - options.max_new_tokens


def score(
    model: Any,
    params: Any,
    task: tasks.Task,
    examples: Sequence[tasks.Example],
    tok: tokenizer_lib.AnyTokenizer,
    options: Options,
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(task metrics, one row per example: id, prediction, target, prompt facts) of prompting
    `model` on `examples` as `options` say."""
    if task.kind == "regression":
        raise KilnError(
            f"Task {task.name!r} is a regression task: prompting scores text answers. Fine-tune"
            " a head (bert, gpt) on it instead."
        )
    layout = models.family_of(model).layout
    if options.scoring == "rank" and layout == Layout.DECODER:
        words = label_words(task, options.label_words) if task.kind == "classification" else {}
        join = template_for(task, options.template).join
        longest = max((len(tok.encode(join + w)) for w in words.values()), default=0)
        room = options.seq_len - 1 - longest
    else:
        room = budget(layout, task, options)
    prompts = prompts_for(task, examples, tok, options, room)
    details: list[dict[str, float]] = [{} for _ in prompts]
    if options.scoring == "rank":
        preds, details = rank(model, params, task, tok, prompts, options)
    else:
        preds = generate(model, params, task, tok, prompts, options, mesh)
    refs = [e.target for e in examples]
    metrics = task_metrics.compute(task.metrics, preds, refs, task.labels, task.positive)
    metrics["prompt_shots"] = float(np.mean([p.shots for p in prompts])) if prompts else 0.0
    metrics["prompts_cut"] = float(sum(p.cut for p in prompts))
    rows = [
        {"id": e.id, "prediction": pred, "target": e.target, "shots": p.shots, "cut": p.cut}
        | ({"scores": d} if d else {})
        for e, pred, p, d in zip(examples, preds, prompts, details)
    ]
    return metrics, rows
