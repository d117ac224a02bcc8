"""Config helpers: the `file.py:key=value` argument, the decode options, JSON round trip
(validation: `kiln.validation`)."""

import importlib.util
import json
import math
import os
import traceback
import types
from typing import TYPE_CHECKING, Any

import ml_collections

from kiln.errors import KilnError

if TYPE_CHECKING:  # Imported lazily at run time: models import jax, config parsing need not.
    pass


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
        if _is_number(defaults[key]) and not _is_number(value):
            raise KilnError(
                f"config argument {key}={value!r} is not a number; {key} takes a number like its"
                f" default {defaults[key]!r} (e.g. `:{key}={defaults[key]}`)."
            )
        values[key] = value
    return values


def _is_number(text: str) -> bool:
    """Whether `text` is a finite number as int() or float() reads it."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def pick(name: str, value: str, options: dict[str, Any]) -> Any:
    """Looks up a named variant (e.g. a size) with an error that lists the choices."""
    if value not in options:
        raise KilnError(
            f"config argument {name}={value!r} is unknown; choose one of {list(options)}."
        )
    return options[value]


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
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # Dotted, reserved keys.
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
    """Loads `path/to/file.py[:args]` the way `--config` does, returning a locked config. A
    missing file, a syntax error, or anything the file raises (a bad argument: `int("abc")`) is
    a KilnError naming the file and line."""
    path, _, arg = spec.partition(":")
    module = load_module(path, f"kiln_config_{abs(hash(path))}")
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise KilnError(
            f"config file {path!r} defines no get_config(arg); an experiment file returns its"
            " ConfigDict from get_config (see experiments/gpt/pretrain.py)."
        )
    config = _call_user_code(path, spec, lambda: get_config(arg or None))
    if not isinstance(config, ml_collections.ConfigDict):
        raise KilnError(
            f"config file {path!r}: get_config({arg or None!r}) returned"
            f" {type(config).__name__}, not an ml_collections.ConfigDict."
        )
    config.lock()
    return config


def load_module(path: str, name: str) -> types.ModuleType:
    """Executes the experiment file `path` as module `name`; a KilnError (file and line) if it
    is missing, is not Python, or raises."""
    example = "e.g. --config experiments/gpt/pretrain.py:size=tiny"
    if not path:
        raise KilnError(f"the config file name is empty: give an experiment file, {example}.")
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "does not exist"
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        raise KilnError(f"config file {path!r} {what}{where}; give an experiment file, {example}.")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise KilnError(f"config file {path!r} is not a Python file (.py); {example}.")
    module = importlib.util.module_from_spec(spec)
    _call_user_code(path, path, lambda: spec.loader.exec_module(module))
    return module


def _call_user_code(path: str, spec: str, call: Any) -> Any:
    """`call()`, which runs the experiment file `path`; what it raises becomes a KilnError."""
    try:
        return call()
    except KilnError:
        raise
    except SyntaxError as e:
        raise KilnError(
            f"config file {path!r}, line {e.lineno}: {e.msg} (a Python syntax error). Fix that"
            " line of the file."
        ) from None
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        mine = [f for f in frames if os.path.abspath(f.filename) == os.path.abspath(path)]
        at = f" at line {mine[-1].lineno}" if mine else ""
        message = " ".join(str(e).split()) or "(no message)"
        raise KilnError(
            f"config file {path!r} failed{at} while building the config of {spec!r}:"
            f" {type(e).__name__}: {message}. Check the arguments after the ':' (their"
            " values and types), or fix the file."
        ) from None
