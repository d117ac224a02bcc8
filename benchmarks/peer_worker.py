"""One system's train step, driven over stdin by benchmarks/peers.py (run in that system's venv).

  python peer_worker.py --system hf_flax --family gpt --shape shape.json --batch batch.npz

Builds the model at the shape in `--shape` (d_model, n_layers, n_heads, d_ff, vocab_size,
seq_len), compiles and warms up (5 steps) its train step (forward, backward, AdamW) on the batch in
`--batch` (arrays written by peers.py from kiln's objectives), prints one JSON line
{"ready": ...}, then for each line "N" on stdin runs N steps and prints {"seconds", "loss",
"minor_faults", "kernel_seconds"} (the process's page faults and kernel CPU time over them);
"quit" ends it with {"max_rss_bytes"}. Every system computes the same loss: the weighted mean
token cross-entropy of the full-vocabulary logits against `targets`. KILN_KEEP_HOST_MEMORY=1
gives a peer kiln's host memory setting (`kiln.tools.host_memory`; kiln has it unless it is 0).

Systems: `kiln` (needs kiln's venv), `hf_flax` (transformers' Flax models under jax.jit with
optax), `torch` (transformers' PyTorch models, eager, torch.optim.AdamW). Dropout is off.
"""

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

LR, BETAS, EPS, WEIGHT_DECAY = 1e-4, (0.9, 0.999), 1e-8, 0.01


def _hf_config(family: str, shape: dict, flax: bool):
    import transformers

    d, layers, heads, ff = shape["d_model"], shape["n_layers"], shape["n_heads"], shape["d_ff"]
    vocab, length = shape["vocab_size"], shape["seq_len"]
    if family == "gpt":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=length, n_embd=d, n_layer=layers, n_head=heads,
            n_inner=ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        )  # fmt: skip
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=ff, max_position_embeddings=length, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0, hidden_act="gelu_new",
        )  # fmt: skip
    return transformers.T5Config(
        vocab_size=vocab, d_model=d, d_kv=d // heads, d_ff=ff, num_layers=layers,
        num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, use_cache=False,
    )  # fmt: skip


def _model_inputs(family: str, batch: dict) -> dict:
    if family == "t5":
        return {"input_ids": batch["encoder_inputs"], "decoder_input_ids": batch["decoder_inputs"]}
    return {"input_ids": batch["inputs"]}


def hf_flax_step(family: str, shape: dict, batch: dict):
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    _clip = jnp.clip  # transformers 4.57.6's Flax T5 still passes a_max=, gone from jax 0.10.

    def clip(x, min=None, max=None, a_min=None, a_max=None):  # noqa: A002
        return _clip(x, a_min if min is None else min, a_max if max is None else max)

    jnp.clip = clip
    cls = {
        "gpt": transformers.FlaxGPT2LMHeadModel,
        "bert": transformers.FlaxBertForMaskedLM,
        "t5": transformers.FlaxT5ForConditionalGeneration,
    }[family]
    model = cls(_hf_config(family, shape, flax=True), seed=0, dtype=jnp.float32)
    optimizer = optax.adamw(LR, *BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    inputs = {k: jnp.asarray(v) for k, v in _model_inputs(family, batch).items()}
    targets, weights = jnp.asarray(batch["targets"]), jnp.asarray(batch["weights"])

    def loss_fn(params):
        logits = model(**inputs, params=params, train=False).logits
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(nll * weights) / jnp.sum(weights)

    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [model.params, optimizer.init(model.params)]
    params = sum(x.size for x in jax.tree.leaves(model.params))

    def run(n: int) -> float:
        loss = None
        for _ in range(n):
            state[0], state[1], loss = step(state[0], state[1])
        return float(jax.block_until_ready(loss))

    return run, params


def torch_step(family: str, shape: dict, batch: dict):
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cls = {
        "gpt": transformers.GPT2LMHeadModel,
        "bert": transformers.BertForMaskedLM,
        "t5": transformers.T5ForConditionalGeneration,
    }[family]
    model = cls(_hf_config(family, shape, flax=False)).train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY
    )
    inputs = {
        k: torch.from_numpy(v.astype(np.int64)) for k, v in _model_inputs(family, batch).items()
    }
    targets = torch.from_numpy(batch["targets"].astype(np.int64)).reshape(-1)
    weights = torch.from_numpy(batch["weights"].astype(np.float32)).reshape(-1)
    params = sum(p.numel() for p in model.parameters())

    def run(n: int) -> float:
        loss = None
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            logits = model(**inputs).logits
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets, reduction="none"
            )
            loss = (nll * weights).sum() / weights.sum()
            loss.backward()
            optimizer.step()
        return float(loss.item())

    return run, params


def kiln_step(family: str, shape: dict, batch: dict):
    import jax

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common
    import peers

    from kiln import sharding

    config = peers.kiln_config(family, shape)
    step, first_state, mesh, _, _ = common.kiln_train_step(config)
    state = [first_state]
    device_batch = jax.device_put(dict(batch), sharding.batch_sharding(mesh))
    params = sum(x.size for x in jax.tree.leaves(state[0].params))

    def run(n: int) -> float:
        out = None
        for _ in range(n):
            state[0], out = step(state[0], device_batch)
        return float(jax.block_until_ready(out["loss"]))

    return run, params


SYSTEMS = {"kiln": kiln_step, "hf_flax": hf_flax_step, "torch": torch_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--family", choices=("gpt", "bert", "t5"), required=True)
    parser.add_argument("--shape", required=True, help="JSON file with the model shape")
    parser.add_argument("--batch", required=True, help="npz file with the batch arrays")
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    if args.system == "kiln" or os.environ.get("KILN_KEEP_HOST_MEMORY") == "1":
        # kiln runs with it as its entry points do (unless KILN_KEEP_HOST_MEMORY=0), a peer only
        # with KILN_KEEP_HOST_MEMORY=1 (benchmarks/host_memory.py compares a peer with and
        # without it); before jax or torch starts its threads.
        from kiln.tools import host_memory

        host_memory.keep_freed_memory()
    with open(args.shape) as f:
        shape = json.load(f)
    batch = dict(np.load(args.batch))
    start = time.perf_counter()
    run, params = SYSTEMS[args.system](args.family, shape, batch)
    loss = run(args.warmup)
    ready = {"ready": True, "params": params, "warmup_s": time.perf_counter() - start}
    print(json.dumps({**ready, "loss": loss}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        steps = int(line)
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = run(steps)
        seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        kernel = {"minor_faults": after.ru_minflt - usage.ru_minflt,
                  "kernel_seconds": after.ru_stime - usage.ru_stime}  # fmt: skip
        print(json.dumps({"seconds": seconds, "loss": loss, **kernel}), flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"max_rss_bytes": rss}), flush=True)


if __name__ == "__main__":
    main()
