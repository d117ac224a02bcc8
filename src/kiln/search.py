"""The decoding options (`DecodeOptions`, validated once) and the loops over a KV-cached
decoder (`kiln.decoding` builds their `feed`): one token per row and step for greedy and
sampling (`token_loop` with a `token_chooser`), and beam search (`beam_loop`).

Beam search runs num_beams rows per prompt; each step extends every live beam by one token,
keeps the 2K best candidates, moves those of the K best that end into the K-best finished list
(scored with the GNMT length penalty: logprob / ((5 + L) / 6) ** length_penalty, L without the
stop token), keeps the K best that do not end live, and reorders the cache rows to their
parents. A prompt stops when no live beam can beat its worst finished one.
"""

import dataclasses
import difflib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kiln.errors import KilnError

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How to generate; see the module docstring for the strategies.

    Attributes:
      strategy: "greedy", "sample" or "beam".
      max_new_tokens: most tokens generated per prompt (GPT also stops at its max_len).
      temperature: sample: logits are divided by it; 0 means greedy.
      top_k: sample: keep the k most likely tokens (0 = all).
      top_p: sample: nucleus mass in (0, 1] (1 = all).
      num_beams: beam: beams per prompt.
      length_penalty: beam: GNMT exponent alpha (0 = raw log-probability; > 0 favours length).
      stop_ids: ids that end a sequence besides eos (not returned).
      seed: sample: the random seed.
    """

    strategy: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_beams: int = 4
    length_penalty: float = 0.6
    stop_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy={self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} is negative")
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams} must be >= 1")
        if any(not isinstance(i, int | np.integer) or i < 0 for i in self.stop_ids):
            problems.append(f"stop_ids={self.stop_ids!r} must be non-negative token ids")
        if problems:
            raise KilnError(f"Bad decoding options: {'; '.join(problems)}.")


DEFAULT_OPTIONS = DecodeOptions()


def decode_options(**options: Any) -> DecodeOptions:
    """`DecodeOptions(**options)`, with a clear error naming the nearest option for a typo."""
    known = [field.name for field in dataclasses.fields(DecodeOptions)]
    for name in options:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise KilnError(f"Unknown decoding option {name!r}.{hint} Options: {', '.join(known)}.")
    if "stop_ids" in options:
        options["stop_ids"] = tuple(int(i) for i in options["stop_ids"])
    return DecodeOptions(**options)


def knobs(options: DecodeOptions) -> dict[str, np.ndarray]:
    """The traced (not static) settings: changing them does not recompile."""
    return {
        "temperature": np.float32(options.temperature),
        "top_k": np.int32(options.top_k),
        "top_p": np.float32(options.top_p),
        "length_penalty": np.float32(options.length_penalty),
        "seed": np.uint32(options.seed),
    }


def token_chooser(
    strategy: str, knobs: dict[str, jax.Array], row_ids_B: jax.Array
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`choose(logits_BV, step) -> ids_B` for greedy or sample. Sampling keys come from each
    row's index in the whole call, so a prompt's samples do not depend on its batch mates."""
    if strategy != "sample":
        return _argmax
    seed_key = jax.random.key(knobs["seed"])
    return functools.partial(
        _sample,
        keys_B=jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(row_ids_B),
        temperature=knobs["temperature"],
        top_k=knobs["top_k"],
        top_p=knobs["top_p"],
    )


def _argmax(logits_BV: jax.Array, step: jax.Array) -> jax.Array:
    del step
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def filter_logits(logits_BV: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside each row's top_k (0 = no limit), then outside the smallest set of most
    likely tokens whose probability reaches top_p, set to -inf (ties at the cut are kept)."""
    vocab = logits_BV.shape[-1]
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k_V = jnp.arange(vocab) < k
    sorted_BV = jnp.where(in_top_k_V, sorted_BV, -jnp.inf)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_B = jnp.sum(in_top_k_V & (mass_before_BV < top_p), axis=-1)
    cut_B1 = jnp.take_along_axis(sorted_BV, (jnp.maximum(kept_B, 1) - 1)[:, None], axis=-1)
    return jnp.where(logits_BV >= cut_B1, logits_BV, -jnp.inf)


def _sample(
    logits_BV: jax.Array,
    step: jax.Array,
    *,
    keys_B: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
) -> jax.Array:
    """One draw per row from the filtered, tempered distribution (argmax at temperature 0)."""
    logits_BV = logits_BV.astype(jnp.float32)
    scaled_BV = logits_BV / jnp.maximum(temperature, jnp.finfo(jnp.float32).tiny)
    filtered_BV = filter_logits(scaled_BV, top_k, top_p)
    step_keys_B = jax.vmap(lambda key: jax.random.fold_in(key, step))(keys_B)
    drawn_B = jax.vmap(jax.random.categorical)(step_keys_B, filtered_BV).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn_B, _argmax(logits_BV, step))


def token_loop(
    feed: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]],
    cache: Any,
    first_tokens_B: jax.Array,
    limits_B: jax.Array,
    stop_ids_S: jax.Array,
    choose: Callable[[jax.Array, jax.Array], jax.Array],
    steps: int,
) -> jax.Array:
    """Feeds the first tokens, then each chosen id back, until every row is done; ids [B, steps].

    Step t feeds column t of a [B, steps + 1] buffer and writes the chosen id to column t + 1.
    A row is done at a stop id or after limit tokens; the loop ends when all rows are done
    (done rows keep running until then; their extra ids are cut on the host).
    """
    tokens_BN = jnp.zeros((first_tokens_B.shape[0], steps + 1), jnp.int32)
    tokens_BN = tokens_BN.at[:, 0].set(first_tokens_B)

    def cond(state: tuple[jax.Array, jax.Array, jax.Array, Any]) -> jax.Array:
        step, _, done_B, _ = state
        return (step < steps) & ~jnp.all(done_B)

    def body(state: tuple[jax.Array, jax.Array, jax.Array, Any]) -> tuple[Any, ...]:
        step, tokens_BN, done_B, cache = state
        tokens_B = jax.lax.dynamic_index_in_dim(tokens_BN, step, axis=1, keepdims=False)
        logits_BV, cache = feed(cache, tokens_B, step)
        next_B = choose(logits_BV, step)
        tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], step + 1, 1)
        done_B = done_B | jnp.isin(next_B, stop_ids_S) | (step + 1 >= limits_B)
        return step + 1, tokens_BN, done_B, cache

    state = (jnp.int32(0), tokens_BN, limits_B <= 0, cache)
    _, tokens_BN, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens_BN[:, 1:]


def _is_cross(path: tuple) -> bool:
    """Whether a cache leaf holds cross-attention keys/values (the same for all beams)."""
    return "cross_" in jax.tree_util.keystr(path)


def _length_penalty(length: jax.Array, alpha: jax.Array) -> jax.Array:
    """GNMT's ((5 + length) / 6) ** alpha."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


class _BeamState(NamedTuple):
    """The `beam_loop` carry (B prompts, K beams, N = steps + 1 columns, R = B * K rows)."""

    step: jax.Array  # int32 scalar: column `step` of seqs_BKN is fed next.
    seqs_BKN: jax.Array  # Live beams' ids (column 0 the first token), best first.
    alive_BK: jax.Array  # Their log-probabilities (-inf: no beam).
    finished_BKN: jax.Array  # The K best finished sequences, best first.
    finished_score_BK: jax.Array  # Their length-penalized scores (-inf: none yet).
    done_B: jax.Array  # Prompts whose best finished sequence can no longer change.
    cache: Any  # Row b * K + k holds beam k of prompt b.


class _Candidates(NamedTuple):
    """The 2K best one-token extensions of each prompt's live beams, best first."""

    logp_BC: jax.Array  # Log-probability of the extended sequence.
    parent_BC: jax.Array  # The live beam (0..K-1) extended.
    token_BC: jax.Array  # The id appended.
    seqs_BCN: jax.Array  # The parent's ids with the token written at column step + 1.


def beam_loop(
    feed: Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]],
    cache: Any,
    first_tokens_R: jax.Array,
    limits_B: jax.Array,
    stop_ids_S: jax.Array,
    *,
    beams: int,
    steps: int,
    length_penalty: jax.Array,
) -> jax.Array:
    """Beam search; the best finished sequence of each prompt, ids [B, steps].

    Rows R = B * K (K = beams). Each step extends the K live beams of a prompt and ranks the
    2K best candidates by log-probability. Those among the first K that end (a stop id, or the
    prompt's limit reached) enter the K-best finished list by penalized score; the K best that
    do not end stay live, and the cache rows are reordered to their parents. With K = 1 and
    length_penalty 0 this is greedy decoding (a penalty > 0 may prefer a longer continuation).
    A prompt is done when its worst finished score is at least the best score a live beam could
    still reach (log-probabilities only fall).
    """
    b, k = limits_B.shape[0], beams
    seqs_BKN = jnp.zeros((b, k, steps + 1), jnp.int32)
    seqs_BKN = seqs_BKN.at[:, :, 0].set(first_tokens_R.reshape(b, k))
    # The K beams start equal: only beam 0 is live, or the first step would pick K copies of
    # each candidate.
    alive_BK = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, k))

    def cond(state: _BeamState) -> jax.Array:
        return (state.step < steps) & ~jnp.all(state.done_B)

    def body(state: _BeamState) -> _BeamState:
        step = state.step
        tokens_R = jax.lax.dynamic_index_in_dim(state.seqs_BKN, step, axis=2, keepdims=False)
        logits_RV, cache = feed(state.cache, tokens_R.reshape(-1), step)
        candidates = _expand_beams(logits_RV, state.alive_BK, state.seqs_BKN, step)
        stop_BC = jnp.isin(candidates.token_BC, stop_ids_S)
        at_limit_B1 = (step + 1 >= limits_B)[:, None]
        finished_BKN, finished_score_BK = _update_finished(
            state, candidates, stop_BC, at_limit_B1, length_penalty
        )
        alive_BK, seqs_BKN, cache = _update_live(candidates, stop_BC | at_limit_B1, cache)
        done_B = _prompts_done(
            state, alive_BK, finished_score_BK, at_limit_B1, limits_B, length_penalty
        )
        return _BeamState(
            step + 1, seqs_BKN, alive_BK, finished_BKN, finished_score_BK, done_B, cache
        )

    state = _BeamState(
        step=jnp.int32(0),
        seqs_BKN=seqs_BKN,
        alive_BK=alive_BK,
        finished_BKN=jnp.zeros_like(seqs_BKN),
        finished_score_BK=jnp.full((b, k), -jnp.inf),
        done_B=limits_B <= 0,  # Filler rows (budget 0) are done from the start.
        cache=cache,
    )
    state = jax.lax.while_loop(cond, body, state)
    return state.finished_BKN[:, 0, 1:]


def _expand_beams(
    logits_RV: jax.Array, alive_BK: jax.Array, seqs_BKN: jax.Array, step: jax.Array
) -> _Candidates:
    """The 2K best extensions of the live beams by log-probability. 2K, because up to K of them
    may end (see `_update_finished`), which still leaves K to continue."""
    (b, k), vocab = alive_BK.shape, logits_RV.shape[-1]
    logp_BKV = jax.nn.log_softmax(logits_RV.astype(jnp.float32)).reshape(b, k, vocab)
    candidates_BKV = alive_BK[:, :, None] + logp_BKV
    logp_BC, flat_BC = jax.lax.top_k(candidates_BKV.reshape(b, k * vocab), 2 * k)
    parent_BC, token_BC = flat_BC // vocab, (flat_BC % vocab).astype(jnp.int32)
    seqs_BCN = jnp.take_along_axis(seqs_BKN, parent_BC[:, :, None], axis=1)
    seqs_BCN = jax.lax.dynamic_update_slice_in_dim(seqs_BCN, token_BC[:, :, None], step + 1, 2)
    return _Candidates(logp_BC, parent_BC, token_BC, seqs_BCN)


def _update_finished(
    state: _BeamState,
    candidates: _Candidates,
    stop_BC: jax.Array,
    at_limit_B1: jax.Array,
    length_penalty: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The K best finished sequences and their scores, after adding the candidates that end."""
    step, k = state.step, state.alive_BK.shape[1]
    # Only the K best candidates may end, as in a search K wide: the extra K are there only so
    # that K beams stay live when some of the best end. A lower-ranked one that ends is dropped
    # (neither finished nor live): finishing it would add a hypothesis a K-wide search never
    # makes, and one beam with length_penalty 0 would no longer be greedy. A candidate of -inf
    # (extending a beam that does not exist) or of a done prompt never ends.
    top_k_C = jnp.arange(2 * k) < k
    ends_BC = (
        (stop_BC | at_limit_B1)
        & top_k_C
        & jnp.isfinite(candidates.logp_BC)
        & ~state.done_B[:, None]
    )
    length_BC = jnp.where(stop_BC, step, step + 1)  # The stop id is not counted.
    score_BC = jnp.where(
        ends_BC, candidates.logp_BC / _length_penalty(length_BC, length_penalty), -jnp.inf
    )
    finished_score_BK, pick_BK = jax.lax.top_k(
        jnp.concatenate([state.finished_score_BK, score_BC], axis=1), k
    )
    finished_BKN = jnp.take_along_axis(
        jnp.concatenate([state.finished_BKN, candidates.seqs_BCN], axis=1),
        pick_BK[:, :, None],
        axis=1,
    )
    return finished_BKN, finished_score_BK


def _update_live(
    candidates: _Candidates, stopped_BC: jax.Array, cache: Any
) -> tuple[jax.Array, jax.Array, Any]:
    """(alive_BK, seqs_BKN, cache): the K best candidates that did not stop (a stop id or the
    limit, whether or not they entered the finished list), and the cache with each row replaced
    by its new beam's parent row (cross-attention leaves are per prompt, the same for all its
    beams, so they stay)."""
    b, k = candidates.logp_BC.shape[0], candidates.logp_BC.shape[1] // 2
    alive_BK, pick_BK = jax.lax.top_k(jnp.where(stopped_BC, -jnp.inf, candidates.logp_BC), k)
    seqs_BKN = jnp.take_along_axis(candidates.seqs_BCN, pick_BK[:, :, None], axis=1)
    parent_rows_R = jnp.arange(b)[:, None] * k + jnp.take_along_axis(
        candidates.parent_BC, pick_BK, 1
    )
    parent_rows_R = parent_rows_R.reshape(-1)
    cache = jax.tree_util.tree_map_with_path(
        lambda path, x: x[parent_rows_R] if x.ndim and not _is_cross(path) else x, cache
    )
    return alive_BK, seqs_BKN, cache


def _prompts_done(
    state: _BeamState,
    alive_BK: jax.Array,
    finished_score_BK: jax.Array,
    at_limit_B1: jax.Array,
    limits_B: jax.Array,
    length_penalty: jax.Array,
) -> jax.Array:
    """Whether each prompt's best finished sequence is final: it was, it reached its limit, or
    no live beam can enter the K-best finished list any more.

    Sound because a live beam's log-probability only falls (each token adds a log p <= 0) and
    its final score is that over a positive penalty: no live beam can score more than the best
    live log-probability (alive_BK[:, 0], the top_k being sorted) over the largest penalty
    still reachable (alpha >= 0: at the longest length, the limit; alpha < 0: at the shortest,
    step + 1). Once the worst of the K finished scores is at least that, none can enter.
    """
    longest = jnp.where(length_penalty >= 0, limits_B, state.step + 1)
    reachable_B = alive_BK[:, 0] / _length_penalty(longest, length_penalty)
    return state.done_B | at_limit_B1[:, 0] | (finished_score_BK[:, -1] >= reachable_B)
