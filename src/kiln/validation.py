"""Validation of a run config, in one place: each section's rules, then the cross-section ones.

Rules that a lower-level constructor also needs (the layer config's, an objective's, the
optimizer's, the decoding options', a fine-tune task's) live there once and run from here, so an
error reads the same wherever it is raised.
"""

import math
from typing import TYPE_CHECKING, Any

import ml_collections

from kiln import config_lib
from kiln.errors import config_error

if TYPE_CHECKING:  # Imported lazily at run time: models import jax, config parsing need not.
    from kiln.models import Family


def _fail(key: str, value: Any, why: str, fix: str) -> None:
    raise config_error(key, value, why, fix)


# Numeric fields outside `model` (its rules: models.layers) and the optimizer's (optim.py):
# (dotted key, smallest value, what it counts), each an integer.
_COUNTS = (
    ("seed", 0, "the seed of init, dropout, masking and data order"),
    ("tokenizer.max_sentences", 1, "documents sampled to train the tokenizer"),
    ("data.seq_len", 1, "tokens per row"),
    ("data.global_batch_size", 1, "rows per step"),
    ("data.streams", 0, "packing streams; 0 = gcd(global_batch_size, 8)"),
    ("init_from.step", -1, "the source's checkpoint step; -1 = its latest"),
    ("task.train_examples", 0, "training examples; 0 = all"),
    ("task.target_len", 1, "target tokens per example"),
    ("task.eval_examples", 0, "examples scored; 0 = all"),
    ("task.doc_stride", 0, "tokens shared by consecutive context windows"),
    ("task.max_answer_len", 1, "tokens of the longest predicted answer"),
    ("train.steps", 0, "training steps; 0 = evaluate the restored model only"),
    ("train.log_every", 1, "steps between metrics lines"),
    ("train.stop_after", 0, "the step this session ends at; 0 = train.steps"),
    ("train.loss_chunks", 0, "chunks of the fused loss; 0 = off"),
    ("eval.every", 1, "steps between evaluations"),
    ("eval.batches", 1, "batches per evaluation"),
    ("eval.sample_tokens", 1, "tokens of the sample"),
    ("checkpoint.every", 1, "steps between checkpoints"),
    ("checkpoint.keep", 1, "recent checkpoints kept, the one to resume from included"),
    ("checkpoint.keep_every", 0, "every K-th step kept forever; 0 = off"),
    ("optim.grad_accum_steps", 1, "microbatches per step"),
    ("distributed.num_processes", 0, "processes; 0 = auto-detect"),
    ("distributed.process_id", -1, "this process's index; -1 = auto-detect"),
)
_SEED_LIMIT = 2**32  # Seeds go through uint32 (decoding) and numpy's SeedSequence.


def _check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every integer field of `_COUNTS` (those the config has) an int at or above its
    minimum; the seed below 2**32; the positive floats finite and positive."""
    for dotted, low, what in _COUNTS:
        section, _, name = dotted.rpartition(".")
        holder = config.get(section) if section else config
        if holder is None or name not in holder:
            continue
        value = holder[name]
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(dotted, value, f"is not an integer ({what})", f"Set an integer >= {low}.")
        if value < low:
            why = f"must be at least {low} ({what})"
            _fail(dotted, value, why, f"Set {dotted} to {low} or more.")
    if config.get("seed", 0) >= _SEED_LIMIT:
        _fail("seed", config.seed, "must be below 2**32", "Use a seed in [0, 4294967295].")
    for dotted, strictly in (("distributed.timeout_s", True), ("optim.head_lr", False)):
        section, name = dotted.split(".")
        value = config.get(section, {}).get(name, 1)
        bad = isinstance(value, bool) or not isinstance(value, int | float)
        if bad or not math.isfinite(value) or value < 0 or (strictly and value == 0):
            want = "a number > 0" if strictly else "a number >= 0 (0 = off)"
            _fail(dotted, value, f"must be {want}", f"Set {dotted} to {want}.")


def validate(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1
) -> tuple[int, int, int]:
    """Checks every rule of `config` (each section's, then the cross-section ones); returns the
    resolved (data, fsdp, tensor) mesh shape."""
    _check_numbers(config)
    family = _check_model(config)
    _check_data(config, family)
    _check_training(config)
    _check_task(config, family)
    _check_init_from(config)
    _check_finetune(config)
    # Fails on bad decoding options before any training.
    config_lib.decode_options(config.decode, config.seed, config.task.target_len)
    return _check_mesh_and_batch(config, num_devices, process_count)


def _check_model(config: ml_collections.ConfigDict) -> "Family":
    """The `model` section: the layer config's rules and the family's fields; its `Family`."""
    from kiln import models  # Local import: models import jax, config parsing need not.

    return models.check_model_section(config.model)


def _check_data(config: ml_collections.ConfigDict, family: "Family") -> None:
    """The `data` and `objective` sections, against the model."""
    from kiln import defaults
    from kiln.data import mixture, objectives, pipeline

    d, o = config.data, config.objective
    mixture.check_config(d)  # data.sources parses; data.prepare_workers >= 1
    objectives.check_options(
        o.name,
        family.layout,
        d.seq_len,
        mask_rate=o.mask_rate,
        noise_density=o.noise_density,
        mean_noise_span_length=o.mean_noise_span_length,
        **defaults.electra_fields(o),
    )
    if o.name not in family.objectives:
        _fail(
            "objective.name",
            o.name,
            f"trains a module that model.family={family.name!r} does not have",
            f"Use one of {list(family.objectives)}.",
        )
    if "streams" in d:
        pipeline.resolve_streams(d.streams, d.global_batch_size)
    if d.seq_len > config.model.max_len:
        _fail(
            "data.seq_len",
            d.seq_len,
            f"exceeds model.max_len={config.model.max_len}",
            f"Lower data.seq_len or raise model.max_len to at least {d.seq_len}.",
        )


def _check_training(config: ml_collections.ConfigDict) -> None:
    """The `train` and `optim` sections (the optimizer's own rules: `optim.make_optimizer`),
    and model selection's keys (`selection.check`)."""
    from kiln import optim, selection

    selection.check(config.checkpoint, config.train, config.eval, config.task.name)

    # steps=0 (evaluation only) builds the optimizer of one step, which never runs.
    optim.make_optimizer(config.optim, max(config.train.steps, 1), config.model.n_layers)
    if config.model.get("scan_layers") and (
        config.optim.name == "adafactor" or config.optim.layer_decay != 1
    ):
        _fail(
            "model.scan_layers",
            True,
            "holds each stack's parameters stacked, which Adafactor (whose statistics and update"
            " clipping follow parameter shapes) and optim.layer_decay (per block) do not support",
            "Use optim.name=adamw or sgd and optim.layer_decay=1, or model.scan_layers=False.",
        )


def _check_task(config: ml_collections.ConfigDict, family: "Family") -> None:
    """The `task` section of a fine-tuning run, as far as it is known before the task is read."""
    from kiln.data import finetune

    t = config.task
    if t.name:
        finetune.check_task(t.name, t.kind, family.layout, t.pack)
        family.check_pooling(t.pooling)


def _check_init_from(config: ml_collections.ConfigDict) -> None:
    """The `init_from` section: one source at most, and what it can give."""
    i = config.init_from
    if i.load not in ("params", "state"):
        _fail("init_from.load", i.load, "is unknown", "Use 'params' or 'state'.")
    hf = i.get("hf", "")
    if hf and i.workdir:
        why = f"is set together with init_from.workdir={i.workdir!r}"
        _fail("init_from.hf", hf, why, "A run starts from one source: clear one of them.")
    if hf and i.load == "state":
        why = "has parameters but no optimizer state"
        _fail("init_from.hf", hf, why, "Use init_from.load='params'.")


def _check_finetune(config: ml_collections.ConfigDict) -> None:
    """The `finetune` section (LoRA, prompt tuning): its own rules, against model and data."""
    from kiln import peft

    peft.check(config)


def _check_mesh_and_batch(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int
) -> tuple[int, int, int]:
    """The `mesh` section and the batch's split over processes, microbatches and devices."""
    from kiln import sharding

    shape = sharding.mesh_shape(config.mesh, num_devices)
    batch, accum = config.data.global_batch_size, config.optim.grad_accum_steps
    batch_devices = shape[0] * shape[1]
    if batch % process_count:
        _fail(
            "data.global_batch_size",
            batch,
            f"is not divisible by the {process_count} processes",
            "Use a multiple of the process count.",
        )
    if batch % accum:
        _fail(
            "data.global_batch_size",
            batch,
            f"is not divisible by optim.grad_accum_steps={accum}",
            "Use a batch that splits into equal microbatches.",
        )
    if (batch // accum) % batch_devices:
        _fail(
            "data.global_batch_size",
            batch,
            f"gives microbatches of {batch // accum} rows, not divisible by the {batch_devices}"
            f" data-parallel devices (mesh.data*mesh.fsdp = {shape[0]}*{shape[1]})",
            f"Use a global batch that is a multiple of {batch_devices * accum}, or shrink"
            " mesh.data/fsdp.",
        )
    return shape
