"""GPT (decoder-only) pre-training with the causal-LM objective on the shipped corpus.

  python -m kiln.main --config experiments/gpt/pretrain.py:size=tiny --workdir runs/gpt_tiny

Arguments after the colon: `size` = tiny | small | base | medium | large | 1b, and `style` =
gpt2 (learned positions, LayerNorm, GELU, tied embeddings) | modern (RoPE, RMSNorm, SwiGLU,
grouped-query attention, no biases). Expected on a 2-core CPU: `size=tiny` runs 400 steps in
about 2 minutes and brings validation perplexity from ~2000 to about 100.
"""

import ml_collections

from kiln import config_lib

# (d_model, n_layers, n_heads, d_ff, vocab_size, seq_len, global_batch_size, steps)
SIZES = {
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
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, dropout and data order

    c.model = ml_collections.ConfigDict()
    c.model.family = "gpt"
    c.model.vocab_size = vocab  # must equal the tokenizer's vocabulary size
    c.model.d_model = d_model
    c.model.n_layers = n_layers
    c.model.n_heads = n_heads
    c.model.n_kv_heads = max(1, n_heads // 4) if modern else n_heads  # < n_heads: GQA
    c.model.d_ff = d_ff if not modern else (d_ff * 2 // 3 // 8) * 8  # SwiGLU: same FLOPs
    c.model.max_len = seq_len  # learned position table rows; >= data.seq_len
    c.model.position = "rope" if modern else "learned"  # learned | rope | none
    c.model.norm = "rmsnorm" if modern else "layernorm"  # layernorm | rmsnorm
    c.model.mlp = "swiglu" if modern else "gelu"  # gelu | relu | swiglu | geglu
    c.model.use_bias = not modern
    c.model.tie_embeddings = True
    c.model.dropout = 0.0  # probability, on attention weights and residual branches
    c.model.norm_eps = 1e-5
    c.model.rope_theta = 10_000.0
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # "" trains one into the workdir; else a tokenizer.model or a workdir
    c.tokenizer.model_type = "bpe"  # bpe | unigram
    c.tokenizer.max_sentences = 300_000  # documents sampled for tokenizer training

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "bible,wordnet"  # comma-separated names or .txt/.jsonl paths
    c.data.data_dir = ""  # "" = the repo's data/ (or $KILN_DATA_DIR)
    c.data.seq_len = seq_len  # tokens per packed row
    c.data.global_batch_size = batch  # rows per step, over all processes

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | adafactor | sgd
    c.optim.lr = 3e-3 if args["size"] == "tiny" else 6e-4
    c.optim.schedule = "cosine"  # cosine | linear | rsqrt | constant
    c.optim.warmup_steps = max(1, steps // 20)
    c.optim.end_lr_fraction = 0.1
    c.optim.weight_decay = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd only
    c.optim.nesterov = False  # sgd only
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off
    c.optim.grad_accum_steps = 1  # microbatches per step

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.log_every = 20  # steps between metrics lines
    c.train.stop_after = 0  # end this session at this step (with a checkpoint); 0 = at train.steps

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100  # steps between validation evaluations (also at the start and the end)
    c.eval.batches = 8  # validation/test batches per evaluation
    c.eval.sample_prompt = "In the beginning"  # greedy sample printed at the end; "" = none
    c.eval.sample_tokens = 32

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # steps between checkpoints (and one at the end)
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.keep_every = 0  # also keep every K-th step forever; 0 = off

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize (also if KILN_DISTRIBUTED=1)
    c.distributed.coordinator_address = ""  # host:port; "" = auto-detect (TPU, SLURM, ...)
    c.distributed.num_processes = 0  # 0 = auto-detect
    c.distributed.process_id = -1  # -1 = auto-detect
    return c
