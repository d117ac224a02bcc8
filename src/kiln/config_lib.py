"""Config helpers: the `file.py:key=value` argument, cross-field validation, JSON round trip."""

import json
import os
from collections.abc import Iterable
from typing import Any

import ml_collections

from kiln.errors import KilnError

MODEL_CHOICES = {
    "family": ("gpt",),
    "position": ("learned", "rope", "none"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "relu", "swiglu", "geglu"),
    "dtype": ("float32", "bfloat16", "float16"),
    "param_dtype": ("float32", "bfloat16"),
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


def _check_choices(config: ml_collections.ConfigDict) -> None:
    for key, choices in MODEL_CHOICES.items():
        value = config.model[key]
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

    m, d = config.model, config.data
    _check_choices(config)
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


def save_json(config: ml_collections.ConfigDict, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        f.write(config.to_json(indent=2, sort_keys=True) + "\n")


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
