"""kiln's default configs: the `model` section and the other sections of a run. Experiment files
build on these and override what they change (pipeline stages: `kiln.arms`)."""

from typing import Any

import ml_collections

# The shipped corpus as data.sources: each part weighted by its training text (M characters).
SHIPPED_MIXTURE = "bible=bible weight=6.5; wordnet=wordnet weight=9.7; sympy=sympy weight=2.1"


# ELECTRA's objective fields: the generator's heads and d_ff as a fraction of the body's, and
# the weight of the replaced-token detection loss next to the generator's masked-LM loss.
ELECTRA_FIELDS = {"generator_fraction": 0.5, "rtd_weight": 50.0}


def electra_fields(objective: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `objective` section's ELECTRA fields, defaults where it has none (a config whose
    objective.name was overridden to electra)."""
    return {k: objective.get(k, v) for k, v in ELECTRA_FIELDS.items()}


def model_section(family: str, **fields: Any) -> ml_collections.ConfigDict:
    """The `model` section with every architecture field; `fields` override the defaults."""
    m = ml_collections.ConfigDict()
    m.family = family  # gpt | bert | t5
    m.vocab_size = 2048  # must equal the tokenizer's vocabulary size
    m.d_model = 128
    m.n_layers = 2  # encoder layers for t5
    m.n_decoder_layers = 0  # t5 only; 0 = n_layers
    m.n_heads = 4
    m.n_kv_heads = 4  # < n_heads: grouped-query attention; 1: multi-query
    m.d_ff = 512
    m.max_len = 128  # learned position table rows; >= data.seq_len
    m.position = "learned"  # learned | rope | none (t5 uses its relative position bias)
    m.norm = "layernorm"  # layernorm | rmsnorm
    m.norm_position = "pre"  # pre | post (classic BERT)
    m.mlp = "gelu"  # gelu | relu | swiglu | geglu
    m.gelu_approximate = True  # tanh GELU (GPT-2, T5 v1.1); False: exact erf GELU (HF BERT)
    m.use_bias = True  # biases of dense layers and LayerNorm
    m.tie_embeddings = True  # output projection = token embedding
    m.type_vocab_size = 0  # token-type embeddings (BERT: 2); 0 = none
    m.relative_buckets = 32  # t5 relative position bias buckets
    m.relative_max_distance = 128  # t5: distances beyond share the last bucket
    m.scale_attention = True  # divide logits by sqrt(head_dim); T5 folds it into the init
    m.head_dim = 0  # attention head size (T5's d_kv); 0 = d_model // n_heads
    m.dropout = 0.0  # probability, on attention weights and residual branches
    # std of the dense kernels at init (embeddings: 0.02); ~d_model ** -0.5 learns faster small
    m.init_std = 0.02
    m.norm_eps = 1e-5
    m.rope_theta = 10_000.0
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"
    # Recompute in the backward pass what each block does not keep: none | dots (keep the
    # matmul outputs) | full (keep the block inputs). Memory for compute; same parameters.
    m.remat = "none"
    # One lax.scan over the blocks instead of unrolling them: compile time independent of depth.
    # The train state holds each stack's parameters stacked; checkpoints stay per-layer, so a
    # run may resume or fine-tune with the other setting. Same function; adamw or sgd only.
    m.scan_layers = False
    for key, value in fields.items():
        m[key] = value
    return m


def micro(c: ml_collections.ConfigDict) -> None:
    """The tests' seconds-long variant of a run (`size=micro`): the data/tiny slice, a small
    tokenizer sample, one evaluation batch, no sample, a log line every step."""
    c.data.data_dir = "data/tiny"
    c.tokenizer.max_sentences = 2000
    c.eval.batches = 1
    c.eval.sample_prompt = ""
    c.train.log_every = 1


def run_sections(
    *, seq_len: int, batch: int, steps: int, lr: float, objective: str
) -> ml_collections.ConfigDict:
    """Every section of a pre-training run but `model`, with kiln's defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, dropout, masking and data order
    _add_inputs(c, seq_len, batch, objective)
    _add_optim(c, lr)
    _add_init_from_and_task(c)
    _add_finetune(c)
    _add_loop(c, steps)
    _add_scale_out(c)
    return c


def _add_inputs(c: ml_collections.ConfigDict, seq_len: int, batch: int, objective: str) -> None:
    """The `tokenizer`, `data` and `objective` sections."""
    c.tokenizer = ml_collections.ConfigDict()
    # "" trains one into the workdir; else a tokenizer.model, a workdir or an HF tokenizer directory
    c.tokenizer.path = ""
    c.tokenizer.model_type = "bpe"  # bpe | unigram
    c.tokenizer.max_sentences = 300_000  # documents sampled (across all sources) to train it

    c.data = ml_collections.ConfigDict()
    # Comma-separated names or .txt/.jsonl paths read as one corpus; when set, it replaces the
    # data.sources mixture (e.g. "bible,wordnet"). "" = train on data.sources.
    c.data.corpus = ""
    c.data.data_dir = ""  # "" = the repo's data/ (or $KILN_DATA_DIR)
    c.data.seq_len = seq_len  # tokens per packed row (encoder inputs for t5)
    c.data.global_batch_size = batch  # rows per step, over all processes
    # Packing streams the global batch is split into (each fills an equal share of its rows
    # from every streams-th document). A process reads and packs only the streams holding its
    # rows: with a process count dividing it no document is read twice. The data order depends
    # on it, never on the process count. 0 = gcd(global_batch_size, 8).
    c.data.streams = 0
    # A weighted mixture: "name=path [weight=W] [field=F]; ..." (path: a .txt/.jsonl(.gz/.xz/
    # .zst)/.parquet file, a directory or a glob, tokenized once into a memory-mapped cache by
    # kiln.tools.prepare or at run start; or a shipped corpus name, read in memory). The default
    # is the shipped corpus, each part weighted by its size in characters (millions).
    c.data.sources = SHIPPED_MIXTURE
    c.data.cache_dir = ""  # "" = <workdir>/token_cache; one subdirectory per source
    c.data.prepare_workers = 1  # processes tokenizing the sources' caches

    c.objective = ml_collections.ConfigDict()
    # gpt: causal_lm | prefix_lm; bert: mlm | electra (replaced-token detection); t5:
    # span_corruption | denoise (the whole row as target, BART-style) | prefix_lm
    c.objective.name = objective
    c.objective.mask_rate = 0.15  # mlm: fraction of ordinary tokens selected
    c.objective.whole_word = False  # mlm: select whole words
    c.objective.noise_density = 0.15  # span_corruption: fraction of tokens dropped
    c.objective.mean_noise_span_length = 3.0  # span_corruption
    if objective == "electra":  # Its own fields only: other runs' configs stay as they were.
        c.objective.update(ELECTRA_FIELDS)


def _add_optim(c: ml_collections.ConfigDict, lr: float) -> None:
    """The `optim` section: optimizer, schedule and fine-tuning learning-rate options."""
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # adamw | adafactor | sgd
    c.optim.lr = lr  # peak learning rate
    c.optim.schedule = "cosine"  # after warmup: cosine | linear | rsqrt | constant
    c.optim.warmup_fraction = 0.05  # of train.steps: linear ramp, the first update at lr / warmup
    c.optim.end_lr_fraction = 0.1  # final lr / peak lr (cosine, linear)
    c.optim.weight_decay = 0.1  # decoupled, on matmul kernels only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.momentum = 0.9  # sgd only
    c.optim.nesterov = False  # sgd only
    c.optim.clip_norm = 1.0  # global-norm clipping; 0 = off
    c.optim.grad_accum_steps = 1  # microbatches per step
    c.optim.head_lr = 0.0  # peak lr of task heads (pooler, classifier); 0 = optim.lr
    c.optim.freeze_body = False  # train the task head only
    c.optim.layer_decay = (
        1.0  # block i of n gets lr * layer_decay ** (n - i); embeddings ** (n + 1)
    )


def _add_init_from_and_task(c: ml_collections.ConfigDict) -> None:
    """The `init_from` section (where a run starts) and `task` (what it fine-tunes on)."""
    c.init_from = ml_collections.ConfigDict()
    # Another run's workdir (or <workdir>/checkpoints/<step>) to start from; "" = scratch. In a
    # pipeline, "@<stage>" names an earlier stage. This workdir's own checkpoint comes first.
    c.init_from.workdir = ""
    # A Hugging Face save_pretrained directory (config.json + model.safetensors, the tokenizer
    # files) to start from instead, imported at the start (kiln.hf). Its model section and
    # tokenizer are the run's: build the config on kiln.hf.checkpoints.kiln_config(dir).
    c.init_from.hf = ""
    c.init_from.step = -1  # -1 = the source's latest checkpoint
    c.init_from.skip = ""  # regex on parameter paths ("mlm_head/.*|pooler/.*") initialised fresh
    c.init_from.load = "params"  # params | state (params and optimizer moments; step still 0)

    c.task = ml_collections.ConfigDict()
    # "" = pre-training on data.corpus with `objective`; else fine-tuning on a labeled task:
    # wn_lexname | bible_genre | kjv2web | code_summary | code_generation |
    # wn_reverse_dictionary | jsonl | squad | chat (conversations, kiln.data.chat)
    c.task.name = ""
    c.task.path = ""  # jsonl: the file (text/label or input/target fields per line)
    c.task.kind = ""  # jsonl: classification | generation | regression | chat; "" = from fields
    # jsonl: the file's names for kiln's fields, "text=sentence1,text_pair=sentence2,label=y"
    c.task.fields = ""
    c.task.metrics = ""  # comma-separated metrics (task_metrics.METRICS_BY_KIND); "" = defaults
    c.task.positive_label = ""  # binary_f1's positive class; "" = the second sorted label
    c.task.labels = ""  # jsonl classification: comma-separated label set; "" = train labels
    c.task.template = ""  # prompt template with {input} (chat: {role}, {content}); "" = default
    c.task.train_examples = 0  # low-resource subset: the first N by md5 of the id; 0 = all
    c.task.target_len = 32  # target tokens kept (and generated) per example
    c.task.pack = False  # gpt generation and chat: pack several examples per row
    c.task.pooling = ""  # classifier head input: bert cls | mean, gpt last | mean; "" = first
    c.task.eval_examples = 0  # validation/test examples scored at the end; 0 = all
    c.task.doc_stride = 32  # extractive QA: tokens shared by consecutive windows of a context
    c.task.max_answer_len = 30  # extractive QA: longest predicted answer, in tokens


def _add_finetune(c: ml_collections.ConfigDict) -> None:
    """The `finetune` section: parameter-efficient fine-tuning (`kiln.peft`, docs/finetuning.md).
    With either method on, the base model is frozen; the adapters and the task head train."""
    c.finetune = ml_collections.ConfigDict()
    c.finetune.lora = ml_collections.ConfigDict()
    c.finetune.lora.rank = 0  # LoRA adapters' rank; 0 = off
    c.finetune.lora.alpha = 16.0  # adapters scaled by alpha / rank
    c.finetune.lora.dropout = 0.0  # on the adapters' input, while training
    # Regex (re.fullmatch) over "/"-joined kernel paths such as block_0/attn/query/kernel
    c.finetune.lora.targets = r".*(attn|mlp)/(query|key|value|out|wi|wi_0|wi_1|wo)/kernel"
    c.finetune.prompt_tuning = ml_collections.ConfigDict()
    c.finetune.prompt_tuning.length = 0  # learned prompt vectors before the input; 0 = off
    c.finetune.prompt_tuning.init = "vocab"  # vocab (random tokens' embeddings) | random


def _add_loop(c: ml_collections.ConfigDict, steps: int) -> None:
    """The `train`, `eval`, `decode` and `checkpoint` sections."""
    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.log_every = 20  # steps between metrics lines
    c.train.stop_after = 0  # end this session at this step (with a checkpoint); 0 = at train.steps
    # > 0: the LM loss is fused with the output projection in this many sequence chunks, so the
    # [batch, length, vocab] logits never exist at once (less memory at large vocabularies).
    c.train.loss_chunks = 0
    # Divergence: each step's loss and the norms of its gradient, update and new parameters
    # must be finite (checked before that state is evaluated or checkpointed). On a failure:
    # stop (name the last good checkpoint) | rollback (go on from it with half the learning
    # rate, skipping the batches since; at most max_rollbacks times per run). docs/reliability.md
    c.train.on_nonfinite = "stop"
    c.train.max_loss_spike = 0.0  # > 1: a loss above this multiple of its running mean diverged
    c.train.max_rollbacks = 3
    # Early stopping: end after this many evaluations in a row without a better validation
    # checkpoint.best_metric (scored from the best checkpoint); 0 = off. kiln.selection
    c.train.early_stop_patience = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100  # steps between validation evaluations (also at the start and the end)
    c.eval.batches = 8  # validation/test batches per evaluation
    c.eval.sample_prompt = ""  # gpt: greedy sample printed at the end; "" = none
    c.eval.sample_tokens = 32
    # Fine-tunes: when evaluations score the task metrics on the validation examples:
    # auto (a head: always, free; text answers: after step 0, one decoding pass each) |
    # always (also at step 0) | end (only the final scoring)
    c.eval.task_metrics = "auto"

    c.decode = ml_collections.ConfigDict()  # generation tasks' scoring and eval.sample_prompt
    c.decode.strategy = "greedy"  # greedy | sample | beam
    c.decode.temperature = 1.0  # sample: 0 = greedy
    c.decode.top_k = 0  # sample: keep the k most likely tokens; 0 = all
    c.decode.top_p = 1.0  # sample: nucleus mass; 1 = all
    c.decode.num_beams = 4  # beam
    c.decode.length_penalty = 0.6  # beam: GNMT alpha; 0 = raw log-probability

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # steps between checkpoints (and one at the end)
    c.checkpoint.keep = 3  # most recent checkpoints kept
    c.checkpoint.keep_every = 0  # also keep every K-th step forever; 0 = off
    # The validation metric choosing the best checkpoint, which is kept and scored at the end:
    # "loss" | "perplexity" | "mse" (lower is better) | a task metric, e.g. "accuracy",
    # "rouge_l" (higher); "" = off (the last step is scored)
    c.checkpoint.best_metric = ""


def _add_scale_out(c: ml_collections.ConfigDict) -> None:
    """The `mesh` and `distributed` sections."""
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.distributed = ml_collections.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize (also if KILN_DISTRIBUTED=1)
    c.distributed.coordinator_address = ""  # host:port; "" = auto-detect (TPU, SLURM, ...)
    c.distributed.num_processes = 0  # 0 = auto-detect
    c.distributed.process_id = -1  # -1 = auto-detect
    c.distributed.timeout_s = 300  # give up (with an error) if the processes have not all joined
