"""Decode throughput: generated tokens/s with and without the KV cache, for GPT and T5.

  .venv/bin/python benchmarks/decode_throughput.py --configs gpt:tiny gpt:small t5:tiny t5:small
  .venv/bin/python benchmarks/decode_throughput.py --quick  # smoke test; appends nothing

Each config is `family:size[:style]` for experiments/<family>/pretrain.py, with random normal
parameters (std 0.02). Every call greedily decodes `--batch` equal-length random prompts for
`--new-tokens` tokens each (eos is an id the model never produces, so every row runs its full
budget). Cached: `kiln.decoding.generate` (prefill / encoder once, then one token per step
through the KV cache). Uncached: a jitted loop that reruns the full forward pass over a fixed
[batch, prompt + new] buffer at every step (T5: encoder and decoder), as generation without a
cache does. Both paths are checked against each other and against a teacher-forced forward
pass. tokens/s = batch * new tokens / median call time; compile s = first call - median call.
Prints a markdown table and appends it, with the machine description, to benchmarks/RESULTS.md.
"""

import argparse
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kiln import decoding, models
from kiln.data import tokenizer
from kiln.models import t5

BOS, EOS = tokenizer.BOS_ID, tokenizer.EOS_ID
TIE_TOLERANCE = 1e-4  # Logit gap under which two ids count as tied for the greedy check.


def random_params(model: nn.Module, seed: int) -> Any:
    """Normal(0, 0.02) parameters of the init's shapes, on the default device."""
    example = models.example_inputs(model, 8)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    rng = np.random.default_rng(seed)  # Not jax.random: XLA:CPU compiles it per shape.
    return jax.tree.map(
        lambda s: jax.device_put((0.02 * rng.normal(size=s.shape)).astype(s.dtype)),
        nn.unbox(shapes),
    )


def uncached_fn(model: nn.Module, prompt_len: int, new_tokens: int) -> Callable[..., jax.Array]:
    """Jitted greedy decoding by full recomputation: (params, prompts [B, P]) -> ids [B, N].

    GPT: the buffer [B, P + N] holds prompt and generated ids; step t reads the logits at
    P - 1 + t and writes their argmax to P + t. T5: the decoder buffer [B, N + 1] starts with
    bos; step t runs encoder and decoder over the first N slots and writes slot t + 1. Later
    slots are hidden by causality, so one shape serves every step.
    """
    if isinstance(model, t5.T5):

        def step_logits(params: Any, prompts_BP: jax.Array, buffer_BL: jax.Array, t: jax.Array):
            logits_BNV = model.apply(
                {"params": params}, prompts_BP, buffer_BL[:, :new_tokens], jnp.ones_like(prompts_BP)
            )
            return jax.lax.dynamic_index_in_dim(logits_BNV, t, axis=1, keepdims=False)

        def start(prompts_BP: jax.Array) -> jax.Array:
            buffer_BL = jnp.zeros((prompts_BP.shape[0], new_tokens + 1), jnp.int32)
            return buffer_BL.at[:, 0].set(BOS)

        offset = 1
    else:

        def step_logits(params: Any, prompts_BP: jax.Array, buffer_BL: jax.Array, t: jax.Array):
            del prompts_BP
            logits_BLV = model.apply({"params": params}, buffer_BL)
            index = prompt_len - 1 + t
            return jax.lax.dynamic_index_in_dim(logits_BLV, index, axis=1, keepdims=False)

        def start(prompts_BP: jax.Array) -> jax.Array:
            pad = jnp.zeros((prompts_BP.shape[0], new_tokens), jnp.int32)
            return jnp.concatenate([prompts_BP, pad], axis=1)

        offset = prompt_len

    @jax.jit
    def run(params: Any, prompts_BP: jax.Array) -> jax.Array:
        def body(t: jax.Array, buffer_BL: jax.Array) -> jax.Array:
            logits_BV = step_logits(params, prompts_BP, buffer_BL, t)
            next_B1 = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)[:, None]
            return jax.lax.dynamic_update_slice_in_dim(buffer_BL, next_B1, offset + t, axis=1)

        buffer_BL = jax.lax.fori_loop(0, new_tokens, body, start(prompts_BP))
        return buffer_BL[:, offset:]

    return run


def greedy_gaps(model: nn.Module, params: Any, prompts_BP: np.ndarray, out_BN: np.ndarray):
    """Per step, max logit minus the logit of the chosen id, from one teacher-forced forward
    pass over prompt + generated ids: 0 where the ids are greedy, tiny at near-ties. [B, N]."""
    n = out_BN.shape[1]
    if isinstance(model, t5.T5):
        decoder_BN = np.concatenate([np.full((len(out_BN), 1), BOS), out_BN[:, :-1]], axis=1)
        logits_BNV = model.apply({"params": params}, prompts_BP, decoder_BN.astype(np.int32))
    else:
        tokens_BL = np.concatenate([prompts_BP, out_BN], axis=1).astype(np.int32)
        logits_BNV = model.apply({"params": params}, tokens_BL)[:, -n - 1 : -1]
    logits_BNV = np.asarray(logits_BNV)
    chosen_BN = np.take_along_axis(logits_BNV, out_BN[:, :, None], axis=-1)[:, :, 0]
    return logits_BNV.max(axis=-1) - chosen_BN


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(median seconds, first-call seconds minus median, output) of `fn`."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return median, max(first - median, 0.0), out


def measure(spec: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    config = common.load_spec(spec)
    model = models.build_model(config.model)
    vocab, max_len = config.model.vocab_size, config.model.max_len
    if prompt_len + new_tokens > max_len or prompt_len < 2:
        raise SystemExit(
            f"{spec}: need 2 <= prompt len and prompt len + new tokens <= max_len={max_len};"
            f" got {prompt_len} + {new_tokens}."
        )
    params = random_params(model, seed=0)
    rng = np.random.default_rng(1)
    body_BP = rng.integers(tokenizer.NUM_SPECIAL_IDS, vocab, (batch, prompt_len - 1), np.int32)
    if isinstance(model, t5.T5):  # Encoder inputs end in eos; the decoder starts from bos.
        prompts_BP = np.concatenate([body_BP, np.full((batch, 1), EOS, np.int32)], axis=1)
    else:  # GPT prompts start with bos.
        prompts_BP = np.concatenate([np.full((batch, 1), BOS, np.int32), body_BP], axis=1)

    options = decoding.DecodeOptions(strategy="greedy", max_new_tokens=new_tokens)
    prompts = prompts_BP.tolist()

    def cached() -> np.ndarray:
        out = decoding.generate(
            model, params, prompts, options, eos_id=vocab, bos_id=BOS, batch_size=batch
        )
        return np.array(out, np.int32)

    uncached = uncached_fn(model, prompt_len, new_tokens)
    prompts_device = jax.device_put(prompts_BP)
    cached_s, cached_compile, cached_BN = timed(cached, repeats)
    uncached_s, uncached_compile, uncached_BN = timed(
        lambda: uncached(params, prompts_device), repeats
    )
    uncached_BN = np.asarray(uncached_BN)

    assert cached_BN.shape == (batch, new_tokens), f"{spec}: cached ids {cached_BN.shape}"
    for name, out_BN in (("cached", cached_BN), ("uncached", uncached_BN)):
        gap = greedy_gaps(model, params, prompts_BP, out_BN).max()
        assert gap <= TIE_TOLERANCE, f"{spec}: {name} ids are not greedy (logit gap {gap:.2e})"
    same = int(np.all(cached_BN == uncached_BN, axis=1).sum())
    if same < batch:
        print(
            f"{spec}: {batch - same} of {batch} rows differ between cached and uncached, at"
            f" near-ties only (every id is within {TIE_TOLERANCE} of the greedy logit)."
        )
    return {
        "config": spec,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cached": batch * new_tokens / cached_s,
        "uncached": batch * new_tokens / uncached_s,
        "cached_compile": cached_compile,
        "uncached_compile": uncached_compile,
        "same": same,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| config | parameters | batch | prompt len | new tokens | cached tok/s | uncached tok/s"
        " | speed-up | cached compile s | uncached compile s | rows equal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['batch']} | {r['prompt_len']} |"
            f" {r['new_tokens']} | {r['cached']:,.0f} | {r['uncached']:,.0f} |"
            f" {r['cached'] / r['uncached']:.1f}x | {r['cached_compile']:.1f} |"
            f" {r['uncached_compile']:.1f} | {r['same']}/{r['batch']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", nargs="+", default=["gpt:tiny", "gpt:small", "t5:tiny", "t5:small"]
    )
    parser.add_argument("--batch", type=int, default=8, help="prompts per call")
    parser.add_argument("--prompt-len", type=int, default=32, help="ids per prompt")
    parser.add_argument("--new-tokens", type=int, default=64, help="generated ids per prompt")
    parser.add_argument("--repeats", type=int, default=3, help="median over repeats")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny configs, batch 4, 16 + 16 tokens, 1 repeat, --no-append",
    )
    parser.add_argument("--no-append", action="store_true", help="print only")
    parser.add_argument("--results", default=str(common.RESULTS))
    args = parser.parse_args()
    if args.quick:
        args.configs = [c for c in args.configs if c.split(":")[1] == "tiny"] or ["gpt:tiny"]
        args.batch, args.prompt_len, args.new_tokens, args.repeats = 4, 16, 16, 1
        args.no_append = True
    rows = [
        measure(spec, args.batch, args.prompt_len, args.new_tokens, args.repeats)
        for spec in args.configs
    ]
    command = shlex.join([".venv/bin/python", "benchmarks/decode_throughput.py", *sys.argv[1:]])
    common.record(
        "decode_throughput",
        f"Command: `{command}`. Greedy decoding, random parameters; median of {args.repeats}"
        " calls; compile s = first call - median.",
        table(rows),
        None if args.no_append else args.results,
    )


if __name__ == "__main__":
    main()
