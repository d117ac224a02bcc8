"""BERT (encoder-only) pre-training with masked-LM on the shipped corpus.

  python -m kiln.main --config experiments/bert/pretrain.py:size=tiny --workdir runs/bert_tiny

Arguments: `size` = micro (data/tiny, 8 steps: for tests) | tiny | small | base (BERT-base,
110M) | large (BERT-large, 340M), and `style` = bert (post-LN, learned positions, GELU, token
types, tied MLM head) | modern (pre-LN, RoPE, RMSNorm), and `objective` = mlm | electra
(replaced-token detection: a generator half the width fills the masked tokens, the model
learns which tokens were replaced; `objective.generator_fraction`, `objective.rtd_weight`).
Masking: 15% of ordinary tokens, 80%
[MASK] / 10% random / 10% kept; `--config.objective.whole_word=True` masks whole words.
Evaluation reports masked-token loss, perplexity and accuracy. Expected on a 2-core CPU:
`size=tiny` runs 400 steps in about 2 minutes; masked-token perplexity ~2100 -> ~315,
masked-token accuracy ~0.12.
"""

import ml_collections

from kiln import config_lib, defaults

# (d_model, n_layers, n_heads, d_ff, vocab_size, seq_len, global_batch_size, steps)
SIZES = {
    "micro": (128, 2, 4, 512, 512, 32, 8, 8),  # data/tiny: the tests' seconds-long runs
    "tiny": (128, 2, 4, 512, 2048, 128, 16, 400),
    "small": (512, 4, 8, 2048, 8192, 128, 32, 5_000),  # ~17M, as BERT-small (L4/H512)
    "base": (768, 12, 12, 3072, 30528, 512, 256, 1_000_000),  # BERT-base
    "large": (1024, 24, 16, 4096, 30528, 512, 256, 1_000_000),  # BERT-large
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, size="tiny", style="bert", objective="mlm")
    d_model, n_layers, n_heads, d_ff, vocab, seq_len, batch, steps = config_lib.pick(
        "size", args["size"], SIZES
    )
    modern = config_lib.pick("style", args["style"], {"bert": False, "modern": True})
    c = defaults.run_sections(
        seq_len=seq_len,
        batch=batch,
        steps=steps,
        lr=2e-3 if args["size"] in ("micro", "tiny") else 1e-4,
        objective=args["objective"],
    )
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
    c.model = defaults.model_section(
        "bert",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        d_ff=d_ff,
        max_len=seq_len,
        position="rope" if modern else "learned",
        norm="rmsnorm" if modern else "layernorm",
        norm_position="pre" if modern else "post",
        type_vocab_size=0 if modern else 2,
        norm_eps=1e-5 if modern else 1e-12,
        dropout=0.0 if args["size"] in ("micro", "tiny") else 0.1,
    )
    if args["size"] == "micro":
        defaults.micro(c)
    return c
