"""GPT (decoder-only) pre-training with the causal-LM objective on the shipped corpus.

  python -m kiln.main --config experiments/gpt/pretrain.py:size=tiny --workdir runs/gpt_tiny

Arguments after the colon: `size` = micro (data/tiny, 8 steps: for tests) | tiny | small | base
| medium | large | 1b, and `style` = gpt2 (learned positions, LayerNorm, GELU, tied embeddings)
| modern (RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases). Expected on a 2-core
CPU: `size=tiny` runs 400 steps in about 2 minutes.
`--config.objective.name=prefix_lm` trains a prefix LM instead. `get_sweep` is a learning rate x
seed grid for `python -m kiln.tools.sweep` (4 runs).
"""

import ml_collections

from kiln import config_lib, defaults
from kiln.tools import sweep

# (d_model, n_layers, n_heads, d_ff, vocab_size, seq_len, global_batch_size, steps)
SIZES = {
    "micro": (128, 2, 4, 512, 512, 32, 8, 8),  # the tests' and benchmarks' seconds-long runs
    "tiny": (128, 2, 4, 512, 2048, 128, 16, 400),  # ~0.7M parameters, two CPU minutes
    "small": (320, 6, 5, 1280, 8192, 256, 32, 5_000),  # ~10M
    "base": (768, 12, 12, 3072, 50304, 1024, 256, 100_000),  # GPT-2 124M
    "medium": (1024, 24, 16, 4096, 50304, 1024, 256, 100_000),  # GPT-2 350M
    "large": (1280, 36, 20, 5120, 50304, 1024, 256, 100_000),  # GPT-2 774M
    "1b": (2048, 18, 16, 8192, 50304, 1024, 256, 100_000),  # ~1.0B
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, size="tiny", style="gpt2")
    d_model, n_layers, n_heads, d_ff, vocab, seq_len, batch, steps = config_lib.pick(
        "size", args["size"], SIZES
    )
    modern = config_lib.pick("style", args["style"], {"gpt2": False, "modern": True})
    c = defaults.run_sections(
        seq_len=seq_len,
        batch=batch,
        steps=steps,
        lr=3e-3 if args["size"] == "tiny" else 6e-4,
        objective="causal_lm",
    )
    c.model = defaults.model_section(
        "gpt",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=max(1, n_heads // 4) if modern else n_heads,
        d_ff=(d_ff * 2 // 3 // 8) * 8 if modern else d_ff,  # SwiGLU: same FLOPs as GELU
        max_len=seq_len,
        position="rope" if modern else "learned",
        norm="rmsnorm" if modern else "layernorm",
        mlp="swiglu" if modern else "gelu",
        use_bias=not modern,
    )
    c.eval.sample_prompt = "In the beginning"
    if args["size"] == "micro":
        defaults.micro(c)
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Learning rate x seed grid, 4 runs of the `arg` config:

    python -m kiln.tools.sweep --config experiments/gpt/pretrain.py:size=tiny --workdir runs/sweep
    """
    del arg  # The same points for every size.
    return sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
