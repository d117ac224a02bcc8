"""T5 (encoder-decoder) pre-training with span corruption on the shipped corpus.

  python -m kiln.main --config experiments/t5/pretrain.py:size=tiny --workdir runs/t5_tiny

Arguments: `size` = micro (data/tiny, 8 steps: for tests) | tiny | small | base (~250M, T5 v1.1
base shape) | large (~780M). T5 v1.1 architecture: RMSNorm without bias, relative position bias
(32 buckets, shared per stack), gated GELU, no biases, untied output layer, no 1/sqrt(d) on
attention logits. Span corruption as in the T5 paper: noise density 0.15, mean span 3, one
sentinel per span; the encoder sees `data.seq_len` tokens. `--config.objective.name=prefix_lm`
trains inputs -> continuation instead. Evaluation reports target-token loss, perplexity and
accuracy. Expected on a 2-core CPU: `size=tiny` runs 400 steps in about 2.5 minutes; target-
token perplexity ~2100 -> ~124, target-token accuracy ~0.27.
"""

import ml_collections

from kiln import config_lib, defaults

# (d_model, n_layers per stack, n_heads, d_ff, vocab_size, seq_len, global_batch_size, steps)
SIZES = {
    "micro": (128, 2, 4, 384, 512, 32, 8, 8),  # data/tiny: the tests' seconds-long runs
    "tiny": (128, 2, 4, 384, 2048, 128, 16, 400),
    "small": (384, 4, 6, 1024, 8192, 256, 32, 5_000),
    "base": (768, 12, 12, 2048, 32128, 512, 128, 500_000),  # T5 v1.1 base
    "large": (1024, 24, 16, 2816, 32128, 512, 128, 500_000),  # T5 v1.1 large
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, size="tiny")
    d_model, n_layers, n_heads, d_ff, vocab, seq_len, batch, steps = config_lib.pick(
        "size", args["size"], SIZES
    )
    c = defaults.run_sections(
        seq_len=seq_len,
        batch=batch,
        steps=steps,
        lr=3e-3 if args["size"] in ("micro", "tiny") else 1e-3,
        objective="span_corruption",
    )
    c.optim.weight_decay = 0.0
    if args["size"] in ("base", "large"):  # The T5 recipe: Adafactor, inverse-sqrt decay.
        c.optim.name = "adafactor"
        c.optim.lr = 1e-2
        c.optim.schedule = "rsqrt"
        c.optim.warmup_fraction = 0.02  # 10k of 500k steps
    c.model = defaults.model_section(
        "t5",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=d_ff,
        max_len=seq_len,
        position="none",
        norm="rmsnorm",
        mlp="geglu",
        use_bias=False,
        tie_embeddings=False,
        scale_attention=False,
        norm_eps=1e-6,
    )
    if args["size"] == "micro":
        defaults.micro(c)
    return c
