"""Config helpers: the `file.py:key=value` argument, cross-field validation, JSON round trip."""

import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from kiln.errors import KilnError

MODEL_CHOICES = {
    "family": ("gpt", "bert", "t5"),
    "norm_position": ("pre", "post"),
    "position": ("learned", "rope", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "relu", "swiglu", "geglu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
    "remat": ("none", "dots", "full"),
}


def parse_arg(arg: str | None, **defaults: str) -> dict[str, str]:
    """Parses the `size=tiny,style=modern` part of `--config file.py:size=tiny,style=modern`."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise KilnError(f"config argument {item!r} is not key=value (e.g. `:size=tiny`).")
        if key not in values:
            raise KilnError(
                f"config argument {key!r} is unknown; this config takes {sorted(values)}."
            )
        values[key] = value
    return values


def pick(name: str, value: str, options: dict[str, Any]) -> Any:
    """Looks up a named variant (e.g. a size) with an error that lists the choices."""
    if value not in options:
        raise KilnError(
            f"config argument {name}={value!r} is unknown; choose one of {list(options)}."
        )
    return options[value]


def _fail(key: str, value: Any, why: str, fix: str) -> None:
    raise KilnError(f"config: {key}={value!r} {why}. {fix}")


def decode_options(config: ml_collections.ConfigDict, max_new_tokens: int | None = None) -> Any:
    """The run's `decoding.DecodeOptions`: the decode section, the run's seed, and
    `max_new_tokens` (default task.target_len)."""
    from kiln import decoding  # Local import: decoding imports jax, config parsing need not.

    try:
        return decoding.decode_options(
            **config.decode.to_dict(),
            seed=config.seed,
            max_new_tokens=config.task.target_len if max_new_tokens is None else max_new_tokens,
        )
    except KilnError as e:
        raise KilnError(f"Config section decode: {e}") from None


def _check_choices(config: ml_collections.ConfigDict) -> None:
    for key, choices in MODEL_CHOICES.items():
        value = config.model.get(key, choices[0])
        if value not in choices:
            _fail(f"model.{key}", value, "is not supported", f"Use one of {list(choices)}.")


def _check_positive(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    for dotted in keys:
        section, name = dotted.split(".")
        value = config[section][name]
        if value <= 0:
            _fail(dotted, value, "must be positive", "Set a value above 0.")


def validate(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1
) -> tuple[int, int, int]:
    """Checks cross-field rules; returns the resolved (data, fsdp, tensor) mesh shape."""
    from kiln import sharding  # Local import: sharding imports jax, config parsing need not.
    from kiln.data import objectives, pipeline

    m, d = config.model, config.data
    _check_choices(config)
    valid = objectives.OBJECTIVES[m.family]
    if config.objective.name not in valid:
        _fail(
            "objective.name",
            config.objective.name,
            f"does not train a model.family={m.family!r} model",
            f"Use one of {list(valid)}, or another family.",
        )
    _check_positive(
        config,
        [
            "model.vocab_size",
            "model.d_model",
            "model.n_layers",
            "model.n_heads",
            "model.n_kv_heads",
            "model.d_ff",
            "model.max_len",
            "data.seq_len",
            "data.global_batch_size",
            "train.steps",
            "optim.grad_accum_steps",
        ],
    )
    if m.get("scan_layers") and (config.optim.name == "adafactor" or config.optim.layer_decay != 1):
        _fail(
            "model.scan_layers",
            True,
            "holds each stack's parameters stacked, which Adafactor (whose statistics and update"
            " clipping follow parameter shapes) and optim.layer_decay (per block) do not support",
            "Use optim.name=adamw or sgd and optim.layer_decay=1, or model.scan_layers=False.",
        )
    if "streams" in d:
        pipeline.resolve_streams(d.streams, d.global_batch_size)
    if config.train.get("loss_chunks", 0) < 0:
        _fail("train.loss_chunks", config.train.loss_chunks, "is negative", "Use 0 (off) or more.")
    if m.d_model % m.n_heads:
        _fail(
            "model.d_model",
            m.d_model,
            f"is not divisible by model.n_heads={m.n_heads}",
            "Pick d_model = n_heads * head_dim.",
        )
    if m.n_heads % m.n_kv_heads:
        _fail(
            "model.n_kv_heads",
            m.n_kv_heads,
            f"does not divide model.n_heads={m.n_heads}",
            "Grouped-query attention needs n_heads to be a multiple of n_kv_heads.",
        )
    if m.position == "rope" and (m.d_model // m.n_heads) % 2:
        _fail(
            "model.n_heads",
            m.n_heads,
            "gives an odd head_dim, which RoPE cannot rotate",
            "Choose n_heads so that d_model / n_heads is even.",
        )
    if not 0.0 <= m.dropout < 1.0:
        _fail("model.dropout", m.dropout, "must be in [0, 1)", "Use e.g. 0.1, or 0.0 for none.")
    decode_options(config)  # Fails on bad decoding options before any training.
    if d.seq_len > m.max_len:
        _fail(
            "data.seq_len",
            d.seq_len,
            f"exceeds model.max_len={m.max_len}",
            f"Lower data.seq_len or raise model.max_len to at least {d.seq_len}.",
        )
    shape = sharding.mesh_shape(config.mesh, num_devices)
    batch_devices = shape[0] * shape[1]
    accum = config.optim.grad_accum_steps
    if d.global_batch_size % process_count:
        _fail(
            "data.global_batch_size",
            d.global_batch_size,
            f"is not divisible by the {process_count} processes",
            "Use a multiple of the process count.",
        )
    if d.global_batch_size % accum:
        _fail(
            "data.global_batch_size",
            d.global_batch_size,
            f"is not divisible by optim.grad_accum_steps={accum}",
            "Use a batch that splits into equal microbatches.",
        )
    micro = d.global_batch_size // accum
    if micro % batch_devices:
        multiple = batch_devices * accum
        _fail(
            "data.global_batch_size",
            d.global_batch_size,
            f"gives microbatches of {micro} rows, not divisible by the {batch_devices}"
            f" data-parallel devices (mesh.data*mesh.fsdp = {shape[0]}*{shape[1]})",
            f"Use a global batch that is a multiple of {multiple}, or shrink mesh.data/fsdp.",
        )
    return shape


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def write_atomically(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` via a temporary file and a rename, so that a concurrent reader
    (another process of the run, a sweep polling summaries) sees the old file or the new one,
    never a half-written one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_json(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    write_atomically(path, config.to_json(indent=2, sort_keys=True) + "\n")


def run_finished(workdir: str | os.PathLike, steps: int) -> bool:
    """Whether the run in `workdir` finished: its summary.json is at step `steps` (a run that
    stopped early with train.stop_after, or never ended, has none or an earlier one)."""
    try:
        with open(os.path.join(workdir, "summary.json")) as f:
            return json.load(f).get("step") == steps
    except (OSError, ValueError):
        return False


def load_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (missing keys included)."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        name = f"{prefix}{key}"
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    return out


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:args]` the way `--config` does, returning a locked config."""
    import importlib.util

    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise KilnError(f"config file {path!r} does not exist.")
    module_spec = importlib.util.spec_from_file_location(f"kiln_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    config.lock()
    return config


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
    m.use_bias = True  # biases of dense layers and LayerNorm
    m.tie_embeddings = True  # output projection = token embedding
    m.type_vocab_size = 0  # token-type embeddings (BERT: 2); 0 = none
    m.relative_buckets = 32  # t5 relative position bias buckets
    m.relative_max_distance = 128  # t5: distances beyond share the last bucket
    m.scale_attention = True  # divide logits by sqrt(head_dim); T5 folds it into the init
    m.dropout = 0.0  # probability, on attention weights and residual branches
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


def run_sections(
    *, seq_len: int, batch: int, steps: int, lr: float, objective: str
) -> ml_collections.ConfigDict:
    """Every section of a pre-training run but `model`, with kiln's defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, dropout, masking and data order

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # "" trains one into the workdir; else a tokenizer.model or a workdir
    c.tokenizer.model_type = "bpe"  # bpe | unigram
    c.tokenizer.max_sentences = 300_000  # documents sampled for tokenizer training

    c.data = ml_collections.ConfigDict()
    c.data.corpus = "bible,wordnet"  # comma-separated names or .txt/.jsonl paths
    c.data.data_dir = ""  # "" = the repo's data/ (or $KILN_DATA_DIR)
    c.data.seq_len = seq_len  # tokens per packed row (encoder inputs for t5)
    c.data.global_batch_size = batch  # rows per step, over all processes
    # Packing streams the global batch is split into (each fills an equal share of its rows
    # from every streams-th document). A process reads and packs only the streams holding its
    # rows: with a process count dividing it no document is read twice. The data order depends
    # on it, never on the process count. 0 = gcd(global_batch_size, 8).
    c.data.streams = 0

    c.objective = ml_collections.ConfigDict()
    # gpt: causal_lm | prefix_lm; bert: mlm; t5: span_corruption | prefix_lm
    c.objective.name = objective
    c.objective.mask_rate = 0.15  # mlm: fraction of ordinary tokens selected
    c.objective.whole_word = False  # mlm: select whole words
    c.objective.noise_density = 0.15  # span_corruption: fraction of tokens dropped
    c.objective.mean_noise_span_length = 3.0  # span_corruption

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

    c.init_from = ml_collections.ConfigDict()
    # Another run's workdir (or <workdir>/checkpoints/<step>) to start from; "" = scratch. In a
    # pipeline, "@<stage>" names an earlier stage. This workdir's own checkpoint comes first.
    c.init_from.workdir = ""
    c.init_from.step = -1  # -1 = the source's latest checkpoint
    c.init_from.skip = ""  # regex on parameter paths ("mlm_head/.*|pooler/.*") initialised fresh
    c.init_from.load = "params"  # params | state (params and optimizer moments; step still 0)

    c.task = ml_collections.ConfigDict()
    # "" = pre-training on data.corpus with `objective`; else fine-tuning on a labeled task:
    # wn_lexname | bible_genre | kjv2web | code_summary | code_generation |
    # wn_reverse_dictionary | jsonl
    c.task.name = ""
    c.task.path = ""  # jsonl: the file (text/label or input/target fields per line)
    c.task.kind = ""  # jsonl: classification | generation; "" = from the fields
    c.task.labels = ""  # jsonl classification: comma-separated label set; "" = train labels
    c.task.template = ""  # prompt template with {input}; "" = the task's default
    c.task.train_examples = 0  # low-resource subset: the first N by md5 of the id; 0 = all
    c.task.target_len = 32  # target tokens kept (and generated) per example
    c.task.pack = False  # gpt generation: pack several examples per row
    c.task.pooling = ""  # classifier head input: bert cls | mean, gpt last | mean; "" = first
    c.task.eval_examples = 0  # validation/test examples scored at the end; 0 = all

    c.train = ml_collections.ConfigDict()
    c.train.steps = steps
    c.train.log_every = 20  # steps between metrics lines
    c.train.stop_after = 0  # end this session at this step (with a checkpoint); 0 = at train.steps
    # > 0: the LM loss is fused with the output projection in this many sequence chunks, so the
    # [batch, length, vocab] logits never exist at once (less memory at large vocabularies).
    c.train.loss_chunks = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 100  # steps between validation evaluations (also at the start and the end)
    c.eval.batches = 8  # validation/test batches per evaluation
    c.eval.sample_prompt = ""  # gpt: greedy sample printed at the end; "" = none
    c.eval.sample_tokens = 32

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
    return c


def finetune_stage(
    pretrain: ml_collections.ConfigDict,
    *,
    task: str,
    train_examples: int,
    epochs: float,
    lr: float,
    seq_len: int,
    batch: int,
    init_from: str = "@pretrain",
    skip: str = "",
    seed: int | None = None,
    target_len: int | None = None,
    eval_examples: int = 0,
) -> ml_collections.ConfigDict:
    """A fine-tuning run of `pretrain`'s architecture on a labeled task (a pipeline stage).

    The model section and tokenizer are the pre-training run's; `init_from=""` makes the
    from-scratch baseline with the same budget (`epochs` over `train_examples`). Heads that
    pre-training had and the task replaces are skipped by name (`skip`, a regex).
    """
    # Today's defaults, overlaid with the source's values: a run written by an older kiln
    # still gets every section.
    c = run_sections(seq_len=seq_len, batch=batch, steps=1, lr=lr, objective="")
    c.model = model_section(pretrain.model.family)
    _overlay(c, pretrain.to_dict())
    c.seed = pretrain.seed if seed is None else seed
    c.tokenizer.path = "@pretrain"
    c.data.seq_len = seq_len
    c.data.global_batch_size = batch
    c.task.name = task
    c.task.train_examples = train_examples
    steps = max(1, round(epochs * train_examples / batch))
    c.train.steps = steps
    c.train.log_every = max(1, steps // 10)
    c.eval.every = steps  # validation at the start and the end
    c.checkpoint.every = steps
    c.checkpoint.keep = 1
    c.optim.lr = lr
    c.optim.schedule = "linear"
    c.optim.end_lr_fraction = 0.0
    c.optim.warmup_fraction = 0.1
    c.init_from.workdir = init_from
    c.init_from.skip = skip
    if target_len is not None:
        c.task.target_len = target_len
    c.task.eval_examples = eval_examples
    return c


def finetune_arms(
    pretrain: ml_collections.ConfigDict, lrs: tuple[float, ...], **stage: Any
) -> dict[str, ml_collections.ConfigDict]:
    """The `finetune` (from `@pretrain`) and `scratch` stages at each learning rate of `lrs`.

    With one rate the stages are `finetune` and `scratch`; with several, `finetune_lr1e-3`,
    `scratch_lr1e-3`, ... (arms whose rate the comparison picks on validation). `stage` goes to
    `finetune_stage`.
    """
    stages = {}
    for arm, source in (("finetune", "@pretrain"), ("scratch", "")):
        for rate in lrs:
            name = arm if len(lrs) == 1 else f"{arm}_lr{rate:.0e}".replace("e-0", "e-")
            stages[name] = finetune_stage(pretrain, lr=rate, init_from=source, **stage)
    return stages


def _overlay(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets the fields of `config` that `values` has (nested), ignoring unknown keys."""
    for key, value in values.items():
        if key not in config:
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _overlay(config[key], value)
        else:
            config[key] = value


def pipeline(
    stages: dict[str, ml_collections.ConfigDict], select: str, advice: str = ""
) -> ml_collections.ConfigDict:
    """A pipeline config: `stages` run in order; arms compared on validation `select`;
    `advice` is printed when pre-training did not beat scratch."""
    c = ml_collections.ConfigDict()
    c.stages = tuple(stages)
    c.select = select
    c.advice = advice
    for name, stage in stages.items():
        c[name] = stage
    return c
