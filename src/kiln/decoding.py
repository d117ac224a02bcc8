"""Generation with a KV cache for the decoder-only (GPT) and encoder-decoder (T5) families.

Strategies (`DecodeOptions.strategy`):
  greedy  the argmax at every step.
  sample  ancestral sampling from softmax(logits / temperature), restricted to the top_k most
          likely tokens and then to the smallest set whose probability reaches top_p
          (temperature 0 is greedy). Row i of a call draws from fold_in(key(seed), i), so the
          same prompts, options and seed give the same samples, whatever the batch size.
  beam    beam search with num_beams beams and the GNMT length penalty: a finished hypothesis
          of L tokens (stop token excluded) scores logprob / ((5 + L) / 6) ** length_penalty.
          A prompt stops when no live beam can beat its worst finished one.

Prompts go in batches of `batch_size` rows (the last filled with dummy rows) and prompt lengths
are padded to a multiple of LENGTH_BUCKET, so jit compiles few shapes. Each batch is one jitted
call: GPT prefills the cache with each prompt but its last token (left-padded, segment 0, so
padding is never attended to); T5 runs its encoder once and caches the cross-attention keys
and values. Then a `lax.while_loop` feeds one token per row and step until every row has
stopped (a stop id or its token budget; the loops are in `kiln.search`). Beam search runs
num_beams rows per prompt and reorders the cache by parent beam at each step. With a `mesh`
the rows are sharded over the batch axes and the models' activation rules apply, as in
training.
"""

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kiln import models, search, sharding
from kiln.data.objectives import Layout
from kiln.errors import KilnError
from kiln.models import blocks
from kiln.search import STRATEGIES, DecodeOptions, decode_options  # noqa: F401 (the public names)

LENGTH_BUCKET = 16
# (cache, tokens_BL, segment_ids_BL, positions_BL) -> (last-position logits [B, V], new cache).
DecodeFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def _encoder_decoder(model: nn.Module) -> bool:
    return models.family_of(model).layout == Layout.ENCODER_DECODER


def init_cache(
    model: nn.Module,
    params: Any,
    batch_size: int,
    max_len: int,
    encoded_BSD: jax.Array | None = None,
    encoder_segment_ids_BS: jax.Array | None = None,
) -> Any:
    """The "cache" collection for decoding `batch_size` rows over `max_len` cache slots.

    The slots must hold everything the decoder reads: GPT the (padded) prompt plus each token
    fed back; T5 the decoder inputs (bos plus each token fed back). Self-attention slots start
    at zero. T5 needs the encoder output (and its segment ids): the cross-attention keys and
    values are computed from it here, once. Works under jit.
    """
    zeros_BS = jnp.zeros((batch_size, max_len), jnp.int32)
    if _encoder_decoder(model):
        if encoded_BSD is None:
            raise KilnError("init_cache: a T5 cache needs the encoder output encoded_BSD.")
        _, variables = model.apply(
            {"params": params},
            encoded_BSD,
            encoder_segment_ids_BS,
            zeros_BS,
            decode=True,
            method="decode",
            mutable=["cache"],
        )
        return variables["cache"]

    def create(params: Any) -> Any:
        _, variables = model.apply({"params": params}, zeros_BS, decode=True, mutable=["cache"])
        return variables["cache"]

    shapes = jax.eval_shape(create, params)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def generate(
    model: nn.Module,
    params: Any,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions = search.DEFAULT_OPTIONS,
    *,
    eos_id: int,
    bos_id: int,
    batch_size: int = 32,
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """Continues each prompt with a KV cache; returns the ids generated before a stop id.

    Args:
      model: a model whose family generates (`kiln.models.Family.generates`): a decoder
        (gpt) or an encoder-decoder (t5).
      params: its parameters as training holds them (the "params" tree, or {"params": tree};
        boxed or not; jax arrays of any sharding: jit follows it).
      prompts: GPT: the token ids to continue (starting with bos). T5: the encoder input ids
        (ending in eos); the decoder starts from bos_id. At most model.config.max_len ids.
      options: the strategy and its settings. GPT generates only what fits its position
        table: at most max_len - len(prompt) tokens. T5 has relative positions only.
      eos_id: a row stops at this id (or one of options.stop_ids), which is not returned.
      bos_id: T5's first decoder input; GPT uses it only for filler rows.
      batch_size: prompts per jitted call (beam search runs num_beams rows for each); each
        prompt's output is independent of its batch mates.
      mesh: if given, rows are sharded over its batch axes (batch_size is rounded up to a
        multiple of their size) and the models' activation rules apply.

    Returns:
      One list of generated ids per prompt, in order.
    """
    _check_prompts(model, prompts)
    if options.max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    params = nn.meta.unbox(params)
    params = params["params"] if "params" in params else params
    params = blocks.unstack_blocks(params)  # Held stacked under model.scan_layers.
    if mesh is not None:  # Prompt rows (and so beam rows) divide over the batch shards.
        shards = int(np.prod([mesh.shape[a] for a in sharding.batch_sharding(mesh).spec[0]]))
        batch_size = _round_up(batch_size, shards)
    stop_ids_S = np.array([eos_id, *options.stop_ids], np.int32)
    outputs = []
    with contextlib.nullcontext() if mesh is None else sharding.activation_rules(mesh):
        for start in range(0, len(prompts), batch_size):
            chunk = [list(p) for p in prompts[start : start + batch_size]]
            outputs += _generate_chunk(
                model, params, chunk, start, options, stop_ids_S, bos_id, batch_size, mesh
            )
    return outputs


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    """Raises a KilnError unless the model generates and every prompt has 1..max_len ids."""
    if not models.family_of(model).generates:
        raise KilnError(f"generate: a {type(model).__name__} model does not generate text.")
    max_len = model.config.max_len
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise KilnError(f"generate: prompt {i} is empty; give it at least one token.")
        if len(prompt) > max_len:
            raise KilnError(
                f"generate: prompt {i} has {len(prompt)} tokens, more than the model's"
                f" max_len={max_len}. Shorten it (or truncate it to its first {max_len} ids)."
            )


def _generate_chunk(
    model: nn.Module,
    params: Any,
    chunk: list[list[int]],
    start: int,
    options: DecodeOptions,
    stop_ids_S: np.ndarray,
    bos_id: int,
    batch_size: int,
    mesh: Mesh | None,
) -> list[list[int]]:
    """The ids generated for up to batch_size prompts (the ones from index `start`), in one
    jitted call; each list is cut at its budget and before its first stop id."""
    make_inputs = _encoder_decoder_inputs if _encoder_decoder(model) else _decoder_inputs
    inputs, limits_B, steps = make_inputs(model, chunk, batch_size, options, bos_id)
    row_ids_B = np.arange(start, start + batch_size, dtype=np.int32)
    out_BN = _generate_batch(
        model,
        params,
        *_place((inputs, limits_B, row_ids_B), mesh),
        stop_ids_S,
        search.knobs(options),
        steps=steps,
        strategy=options.strategy,
        beams=options.num_beams if options.strategy == "beam" else 1,
        mesh=mesh,
    )
    # The rows past len(chunk) are filler (budget 0, done from the start): they give every
    # call batch_size rows, so jit compiles one shape. Their ids are dropped here.
    rows_BN = np.asarray(out_BN)[: len(chunk)]
    return [
        _until_stop(row[:limit].tolist(), stop_ids_S)
        for row, limit in zip(rows_BN, limits_B, strict=False)
    ]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _until_stop(ids: list[int], stop_ids_S: np.ndarray) -> list[int]:
    stops = np.flatnonzero(np.isin(ids, stop_ids_S))
    return ids[: stops[0]] if stops.size else ids


def _place(tree: Any, mesh: Mesh | None) -> Any:
    """Host arrays -> global arrays with rows over the mesh's batch axes (every process holds
    the same values); unchanged without a mesh."""
    if mesh is None:
        return tree
    target = sharding.batch_sharding(mesh)

    def place(x: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(x.shape, target, lambda index: x[index])

    return jax.tree.map(place, tree)


def _decoder_inputs(
    model: nn.Module,
    prompts: list[list[int]],
    batch_size: int,
    options: DecodeOptions,
    bos_id: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Inputs of `_generate_batch`, row budgets and step count for GPT.

    The prefill is each prompt but its last token, left-padded (segment 0) with positions from
    0 per prompt; the loop starts by feeding the last token.
    """
    max_len, n_real = model.config.max_len, len(prompts)
    max_new_tokens = options.max_new_tokens
    prompts = prompts + [[bos_id]] * (batch_size - n_real)  # Filler rows, budget 0.
    length = _round_up(max(len(p) for p in prompts) - 1, LENGTH_BUCKET)
    tokens_BP, segment_ids_BP, positions_BP = np.zeros((3, batch_size, length), np.int32)
    for i, prompt in enumerate(prompts):
        start = length - len(prompt) + 1
        tokens_BP[i, start:] = prompt[:-1]
        segment_ids_BP[i, start:] = 1
        positions_BP[i, start:] = np.arange(len(prompt) - 1)
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    limits_B = np.minimum(max_new_tokens, max_len - lengths_B).astype(np.int32)
    limits_B[n_real:] = 0
    inputs = {
        "prefill_tokens": tokens_BP,
        "prefill_segment_ids": segment_ids_BP,
        "prefill_positions": positions_BP,
        "first_tokens": np.array([p[-1] for p in prompts], np.int32),
        "first_positions": lengths_B - 1,
    }
    return inputs, limits_B, min(max_new_tokens, max_len)


def _encoder_decoder_inputs(
    model: nn.Module,
    prompts: list[list[int]],
    batch_size: int,
    options: DecodeOptions,
    bos_id: int,
) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Inputs of `_generate_batch` (right-padded encoder inputs), row budgets, steps for T5."""
    del model  # The same signature as `_decoder_inputs`.
    n_real, max_new_tokens = len(prompts), options.max_new_tokens
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


@functools.partial(jax.jit, static_argnames=("model", "steps", "strategy", "beams", "mesh"))
def _generate_batch(
    model: nn.Module,
    params: Any,
    inputs: dict[str, jax.Array],
    limits_B: jax.Array,
    row_ids_B: jax.Array,
    stop_ids_S: jax.Array,
    knobs: dict[str, jax.Array],
    *,
    steps: int,
    strategy: str,
    beams: int,
    mesh: Mesh | None,
) -> jax.Array:
    """Generated ids [B, steps] of one batch (valid up to each row's first stop and limit);
    row_ids_B: each row's index in the whole call (its sampling key)."""
    rows = limits_B.shape[0] * beams
    if beams > 1:  # Beam k of prompt b is row b * beams + k.
        inputs = jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), inputs)
    decode, context, max_position = _decode_adapter(model, params, inputs)
    prefill_len = inputs["prefill_tokens"].shape[1] if "prefill_tokens" in inputs else 0
    cache = init_cache(model, params, rows, _round_up(prefill_len + steps, LENGTH_BUCKET), *context)
    if prefill_len:  # Fills the cache; its logits are unused (and compiled away).
        prefill = ("prefill_tokens", "prefill_segment_ids", "prefill_positions")
        _, cache = decode(cache, *(inputs[key] for key in prefill))

    def positions(step: jax.Array) -> jax.Array:
        positions_B = inputs["first_positions"] + step
        return positions_B if max_position is None else jnp.minimum(positions_B, max_position)

    def feed(cache: Any, tokens_B: jax.Array, step: jax.Array) -> tuple[jax.Array, Any]:
        tokens_B1 = tokens_B[:, None]
        return decode(cache, tokens_B1, jnp.ones_like(tokens_B1), positions(step)[:, None])

    if strategy == "beam":
        out_BN = search.beam_loop(
            feed,
            cache,
            inputs["first_tokens"],
            limits_B,
            stop_ids_S,
            beams=beams,
            steps=steps,
            length_penalty=knobs["length_penalty"],
        )
    else:
        choose = search.token_chooser(strategy, knobs, row_ids_B)
        out_BN = search.token_loop(
            feed, cache, inputs["first_tokens"], limits_B, stop_ids_S, choose, steps
        )
    if mesh is None:
        return out_BN
    return jax.lax.with_sharding_constraint(out_BN, NamedSharding(mesh, PartitionSpec()))


def _decode_adapter(
    model: nn.Module, params: Any, inputs: dict[str, jax.Array]
) -> tuple[DecodeFn, tuple[jax.Array, ...], int | None]:
    """One decoding interface over both layouts: (decode, context, max_position).

    `decode` is a `DecodeFn`. `context` is what `init_cache` needs besides the shapes: T5's
    encoder output and segment ids (the encoder runs here, once per batch, and T5 decodes with
    `method="decode"` over it); nothing for GPT. `max_position` caps the decoder positions fed:
    GPT's position table has max_len entries, but the loop keeps feeding every row until all
    are done, so a row done early (a stop id, or a long prompt's small budget) can run past
    max_len - 1. Its extra ids are cut on the host; the cap only keeps its lookups in the
    table. T5 has relative positions only: None, no cap.
    """
    variables = {"params": params}
    if _encoder_decoder(model):
        encoder_segment_ids_BS = inputs["encoder_segment_ids"]
        encoded_BSD = model.apply(
            variables, inputs["encoder_inputs"], encoder_segment_ids_BS, method="encode"
        )
        context, method, max_position = (encoded_BSD, encoder_segment_ids_BS), "decode", None
    else:
        context, method = (), None
        max_position = model.config.max_len - 1  # Rows fed after they are done may pass it.

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

    return decode, context, max_position
