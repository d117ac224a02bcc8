"""Config helpers: the `file.py:key=value` argument, cross-field validation, JSON round trip."""

import json
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import ml_collections

from kiln.errors import KilnError, config_error

if TYPE_CHECKING:  # Imported lazily at run time: models import jax, config parsing need not.
    from kiln.models import Family


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
    raise config_error(key, value, why, fix)


def decode_options(decode_cfg: ml_collections.ConfigDict, seed: int, max_new_tokens: int) -> Any:
    """The `decoding.DecodeOptions` of the `decode` section, the run's seed and
    `max_new_tokens`."""
    from kiln import decoding  # Local import: decoding imports jax, config parsing need not.

    try:
        return decoding.decode_options(
            **decode_cfg.to_dict(), seed=seed, max_new_tokens=max_new_tokens
        )
    except KilnError as e:
        raise KilnError(f"Config section decode: {e}") from None


def _check_positive(config: ml_collections.ConfigDict, keys: Iterable[str]) -> None:
    for dotted in keys:
        section, name = dotted.split(".")
        value = config[section][name]
        if value <= 0:
            _fail(dotted, value, "must be positive", "Set a value above 0.")


def validate(
    config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1
) -> tuple[int, int, int]:
    """Checks every rule of `config` (each section's, then the cross-section ones); returns the
    resolved (data, fsdp, tensor) mesh shape.

    Rules that a lower-level constructor also needs (the layer config's, an objective's, the
    optimizer's, the decoding options', a fine-tune task's) live there once and run from here,
    so an error reads the same wherever it is raised.
    """
    family = _check_model(config)
    _check_data(config, family)
    _check_training(config)
    _check_task(config, family)
    _check_init_from(config)
    # Fails on bad decoding options before any training.
    decode_options(config.decode, config.seed, config.task.target_len)
    return _check_mesh_and_batch(config, num_devices, process_count)


def _check_model(config: ml_collections.ConfigDict) -> "Family":
    """The `model` section: the layer config's rules and the family's fields; its `Family`."""
    from kiln import models  # Local import: models import jax, config parsing need not.

    return models.check_model_section(config.model)


def _check_data(config: ml_collections.ConfigDict, family: "Family") -> None:
    """The `data` and `objective` sections, against the model."""
    from kiln.data import objectives, pipeline

    d, o = config.data, config.objective
    _check_positive(config, ["data.seq_len", "data.global_batch_size"])
    objectives.check_options(
        o.name,
        family.layout,
        d.seq_len,
        mask_rate=o.mask_rate,
        noise_density=o.noise_density,
        mean_noise_span_length=o.mean_noise_span_length,
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
    """The `train` and `optim` sections (the optimizer's own rules: `optim.make_optimizer`)."""
    from kiln import optim

    _check_positive(config, ["train.steps", "optim.grad_accum_steps"])
    if config.train.get("loss_chunks", 0) < 0:
        _fail("train.loss_chunks", config.train.loss_chunks, "is negative", "Use 0 (off) or more.")
    optim.make_optimizer(config.optim, config.train.steps, config.model.n_layers)
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


def load_json(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A config.json written by a run; a `model` section written before a model field existed
    gets that field's default (what the run computed with), so older runs resume and
    fine-tune. A file that cannot be read or is not a JSON object of config sections is a
    KilnError naming it."""
    config = _read_config_json(path)
    model = config.get("model")
    if isinstance(model, dict) and "family" in model:
        from kiln import defaults

        config["model"] = {**defaults.model_section(model["family"]).to_dict(), **model}
    try:
        return ml_collections.ConfigDict(config)
    except Exception as e:  # ml_collections rejects some keys (dotted, reserved names).
        raise _bad_config_json(path, f"it has keys a config cannot hold ({e})") from None


def _read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`, each of its kiln sections an object; else a KilnError."""
    from kiln import defaults

    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise KilnError(f"{path} cannot be read: {e.strerror or e}.") from None
    except ValueError as e:  # Not UTF-8 (UnicodeDecodeError), or not JSON.
        raise _bad_config_json(path, f"it is not JSON text ({e})") from None
    if not isinstance(config, dict):
        raise _bad_config_json(path, f"it holds a JSON {type(config).__name__}, not an object")
    sections = ["model", *defaults.run_sections(seq_len=1, batch=1, steps=1, lr=0.0, objective="")]
    for key in sections:
        if key in config and key != "seed" and not isinstance(config[key], dict):
            raise _bad_config_json(path, f"its {key!r} section is not an object")
    return config


def _bad_config_json(path: str | os.PathLike, why: str) -> KilnError:
    return KilnError(
        f"{path} is not a config.json kiln wrote: {why}. kiln writes it when a run starts; if"
        " it was damaged, delete it and re-run the run's command (same --config), or restore it"
        " from a copy."
    )


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
