"""Greedy decoding with a KV cache, for the decoder-only (GPT) and encoder-decoder (T5) families.

Prompts go in batches of `batch_size` rows (the last one filled with dummy rows) and prompt
lengths are padded to a multiple of LENGTH_BUCKET, so jit compiles few shapes. Each batch is one
jitted call. GPT: a prefill of each prompt but its last token (left-padded, segment 0) fills the
cache; T5: the encoder runs once. Then a `lax.while_loop` feeds one token per row and step (first
the last prompt token / bos, then each argmax) until every row has produced eos or its budget.
The cache holds the prefill plus max_new_tokens slots (rounded up to LENGTH_BUCKET).
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import KilnError
from kiln.models import gpt, t5

LENGTH_BUCKET = 16

# (cache, tokens_BL, segment_ids_BL, positions_BL) -> (last-position logits [B, V], new cache).
DecodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def init_cache(model: nn.Module, params: Any, batch_size: int, max_len: int) -> Any:
    """A zeroed "cache" collection for decoding `batch_size` rows over `max_len` cache slots.

    The slots must hold everything the decoder reads: GPT the (padded) prompt plus each token
    fed back; T5 the decoder inputs (bos plus each token fed back). Works under jit.
    """

    def create(params: Any) -> Any:
        zeros_BS = jnp.zeros((batch_size, max_len), jnp.int32)
        if isinstance(model, t5.T5):
            encoded_B1D = jnp.zeros((batch_size, 1, model.config.d_model), model.config.dtype)
            args, method = (encoded_B1D, None, zeros_BS), t5.T5.decode
        else:
            args, method = (zeros_BS,), None
        _, variables = model.apply(
            {"params": params}, *args, decode=True, method=method, mutable=["cache"]
        )
        return variables["cache"]

    shapes = jax.eval_shape(create, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def greedy_generate(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    bos_id: int,
    batch_size: int = 32,
) -> list[list[int]]:
    """Greedy continuation of each prompt with a KV cache; ids generated before eos (eos excluded).

    Args:
      model: a `gpt.GPT` or `t5.T5`.
      params: its parameters as training holds them (the "params" tree, or {"params": tree};
        boxed or not; jax arrays of any sharding: jit follows it).
      prompts: GPT: the token ids to continue (starting with bos). T5: the encoder input ids
        (ending in eos); the decoder starts from bos_id.
      max_new_tokens: most tokens generated per prompt. GPT generates only what fits its
        position table: at most model.config.max_len - len(prompt) tokens (prompt plus output
        never exceed max_len). T5 has relative positions only and no such limit.
      eos_id: generation of a row stops at this id, which is not returned.
      bos_id: T5's first decoder input; GPT uses it only for filler rows.
      batch_size: rows per jitted call; each prompt's output is independent of its batch mates.

    Returns:
      One list of generated ids per prompt, in order.
    """
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise KilnError("greedy_generate: every prompt needs at least one token.")
    if not isinstance(model, gpt.GPT | t5.T5):
        raise KilnError(f"greedy_generate: {type(model).__name__} is neither GPT nor T5.")
    longest, max_len = max(map(len, prompts), default=0), model.config.max_len
    if isinstance(model, gpt.GPT) and longest > max_len:
        raise KilnError(
            f"greedy_generate: a prompt has {longest} tokens, more than model.max_len={max_len}."
        )
    params = nn.meta.unbox(params)
    params = params["params"] if "params" in params else params
    outputs = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        if isinstance(model, t5.T5):
            inputs, limits_B, steps = _t5_inputs(chunk, batch_size, max_new_tokens, bos_id)
        else:
            inputs, limits_B, steps = _gpt_inputs(model, chunk, batch_size, max_new_tokens, bos_id)
        out_BN = np.asarray(
            _generate_batch(model, params, inputs, limits_B, np.int32(eos_id), steps=steps)
        )
        for row, limit in zip(out_BN[: len(chunk)], limits_B[: len(chunk)], strict=True):
            outputs.append(_until_eos(row[:limit].tolist(), eos_id))
    return outputs


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _gpt_inputs(
    model: gpt.GPT, prompts: list[list[int]], batch_size: int, max_new_tokens: int, bos_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Inputs of `_generate_batch`, row budgets and step count for GPT.

    The prefill is each prompt but its last token, left-padded (segment 0) with positions from
    0 per prompt; the loop starts by feeding the last token.
    """
    max_len, n_real = model.config.max_len, len(prompts)
    prompts = prompts + [[bos_id]] * (batch_size - n_real)  # Filler rows, budget 0.
    length = _round_up(max(len(p) for p in prompts) - 1, LENGTH_BUCKET)
    tokens_BP, segment_ids_BP, positions_BP = np.zeros((3, batch_size, length), np.int32)
    for i, prompt in enumerate(prompts):
        start = length - len(prompt) + 1
        tokens_BP[i, start:] = prompt[:-1]
        segment_ids_BP[i, start:] = 1
        positions_BP[i, start:] = np.arange(len(prompt) - 1)
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    limits_B = np.minimum(max_new_tokens, max_len - lengths_B)
    limits_B[n_real:] = 0
    inputs = {
        "prefill_tokens": tokens_BP,
        "prefill_segment_ids": segment_ids_BP,
        "prefill_positions": positions_BP,
        "first_tokens": np.array([p[-1] for p in prompts], np.int32),
        "first_positions": lengths_B - 1,
    }
    return inputs, limits_B, min(max_new_tokens, max_len)


def _t5_inputs(
    prompts: list[list[int]], batch_size: int, max_new_tokens: int, bos_id: int
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Inputs of `_generate_batch` (right-padded encoder inputs), row budgets, steps for T5."""
    n_real = len(prompts)
    prompts = prompts + [prompts[0]] * (batch_size - n_real)  # Filler rows, budget 0.
    length = _round_up(max(len(p) for p in prompts), LENGTH_BUCKET)
    encoder_inputs_BS, encoder_segment_ids_BS = np.zeros((2, batch_size, length), np.int32)
    for i, prompt in enumerate(prompts):
        encoder_inputs_BS[i, : len(prompt)] = prompt
        encoder_segment_ids_BS[i, : len(prompt)] = 1
    inputs = {
        "encoder_inputs": encoder_inputs_BS,
        "encoder_segment_ids": encoder_segment_ids_BS,
        "first_tokens": np.full(batch_size, bos_id, np.int32),
        "first_positions": np.zeros(batch_size, np.int32),
    }
    limits_B = np.where(np.arange(batch_size) < n_real, max_new_tokens, 0).astype(np.int32)
    return inputs, limits_B, max_new_tokens


@functools.partial(jax.jit, static_argnames=("model", "steps"))
def _generate_batch(
    model: nn.Module,
    params: Any,
    inputs: dict[str, jax.Array],
    limits_B: jax.Array,
    eos_id: jax.Array,
    *,
    steps: int,
) -> jax.Array:
    """Generated ids [B, steps] of one batch (valid up to each row's first eos and limit)."""
    variables = {"params": params}
    if isinstance(model, t5.T5):
        encoder_segment_ids_BS = inputs["encoder_segment_ids"]
        encoded_BSD = model.apply(
            variables, inputs["encoder_inputs"], encoder_segment_ids_BS, method=t5.T5.encode
        )
        context, method, max_position = (encoded_BSD, encoder_segment_ids_BS), t5.T5.decode, None
    else:
        context, method = (), None
        max_position = model.config.max_len - 1  # Filler and finished rows may run past it.

    def decode(cache: Any, *decoder_inputs: jax.Array) -> tuple[jax.Array, Any]:
        logits_BLV, new = model.apply(
            {**variables, "cache": cache},
            *context,
            *decoder_inputs,
            decode=True,
            method=method,
            mutable=["cache"],
        )
        return logits_BLV[:, -1], new["cache"]

    prefill_len = inputs["prefill_tokens"].shape[1] if "prefill_tokens" in inputs else 0
    cache_len = _round_up(prefill_len + steps, LENGTH_BUCKET)
    cache = init_cache(model, params, limits_B.shape[0], cache_len)
    if prefill_len:  # Fills the cache; its logits are unused (and compiled away).
        prefill = ("prefill_tokens", "prefill_segment_ids", "prefill_positions")
        _, cache = decode(cache, *(inputs[key] for key in prefill))
    first_positions_B = inputs["first_positions"]
    if max_position is not None:
        first_positions_B = jnp.minimum(first_positions_B, max_position)
    return _greedy_loop(
        decode,
        cache,
        inputs["first_tokens"],
        first_positions_B,
        limits_B,
        eos_id,
        steps=steps,
        max_position=max_position,
    )


def _greedy_loop(
    decode: DecodeFn,
    cache: Any,
    first_tokens_B: jax.Array,
    first_positions_B: jax.Array,
    limits_B: jax.Array,
    eos_id: jax.Array,
    *,
    steps: int,
    max_position: int | None,
) -> jax.Array:
    """Feeds the first tokens, then each argmax back, until every row is done; ids [B, steps].

    Step t feeds column t of a [B, steps + 1] buffer at position first_position + t and writes
    the argmax to column t + 1. A row is done at eos or after limit tokens; the loop stops when
    all rows are done (done rows keep running until then, their extra ids are cut on the host).
    """
    tokens_BN = jnp.zeros((first_tokens_B.shape[0], steps + 1), jnp.int32)
    tokens_BN = tokens_BN.at[:, 0].set(first_tokens_B)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array, Any]) -> jax.Array:
        step, _, done_B, _ = state
        return (step < steps) & ~jnp.all(done_B)

    def body(state: tuple[jax.Array, jax.Array, jax.Array, Any]) -> tuple[Any, ...]:
        step, tokens_BN, done_B, cache = state
        tokens_B1 = jax.lax.dynamic_slice_in_dim(tokens_BN, step, 1, axis=1)
        positions_B1 = (first_positions_B + step)[:, None]
        if max_position is not None:
            positions_B1 = jnp.minimum(positions_B1, max_position)
        logits_BV, cache = decode(cache, tokens_B1, jnp.ones_like(tokens_B1), positions_B1)
        next_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], step + 1, 1)
        done_B = done_B | (next_B == eos_id) | (step + 1 >= limits_B)
        return step + 1, tokens_BN, done_B, cache

    state = (jnp.int32(0), tokens_BN, limits_B <= 0, cache)
    _, tokens_BN, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens_BN[:, 1:]
