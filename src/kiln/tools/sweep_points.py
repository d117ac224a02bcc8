"""Sweep points: the builders an experiment's `get_sweep()` uses (`grid`, `zipped`,
`random_search`, `concat`), the checks of its points against the experiment's config (every key
a field, every value of the field's type), and the workdir name of each point.
"""

from __future__ import annotations

import difflib
import hashlib
import inspect
import itertools
import math
import random
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from kiln import config_lib
from kiln.errors import KilnError

Point = dict[str, Any]

TYPE_NAMES = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a string"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]+")
_MAX_NAME = 200


def a_type(value: Any) -> str:
    """`an int`, `a float`: the type of `value` with its article."""
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def grid(axes: dict[str, Sequence[Any]]) -> list[Point]:
    """Cartesian product: `grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})` -> 4 points (the
    last key varies fastest)."""
    _check_axes(axes)
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(axes: dict[str, Sequence[Any]]) -> list[Point]:
    """Element-wise: `zipped({"optim.lr": [1e-3, 3e-3], "optim.warmup_fraction": [0.1, 0.5]})` -> 2
    points. Every axis must have the same length."""
    _check_axes(axes)
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise KilnError(f"sweep.zipped needs axes of equal length; got {lengths}.")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*axes.values())]


def random_search(space: dict[str, Any], n: int, seed: int = 0) -> list[Point]:
    """`n` points drawn with `seed`: a list is a set of choices; `(lo, hi, "log" | "linear")`
    draws a float between lo and hi (log-uniform or uniform; int fields take lists)."""
    if n < 1:
        raise KilnError(f"sweep.random_search needs n >= 1; got n={n}.")
    _check_axes(space, tuples=True)
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        point = {}
        for key, dim in space.items():
            if isinstance(dim, tuple):
                lo, hi, scale = dim
                if scale == "log":
                    point[key] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
                else:
                    point[key] = rng.uniform(lo, hi)
            else:
                point[key] = rng.choice(list(dim))
        points.append(point)
    return points


def concat(*lists: list[Point]) -> list[Point]:
    """The points of several sweeps, in order: `concat(grid({...}), grid({...}))`."""
    return [dict(point) for points in lists for point in points]


def _check_axes(axes: dict[str, Any], tuples: bool = False) -> None:
    if not isinstance(axes, dict) or not axes:
        raise KilnError(
            f"a sweep needs a non-empty dict of dotted keys to values; got {axes!r}"
            ' (e.g. {"optim.lr": [1e-3, 3e-3]}).'
        )
    for key, values in axes.items():
        if tuples and isinstance(values, tuple):
            ok = (
                len(values) == 3
                and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values[:2])
                and values[2] in ("log", "linear")
                and values[0] < values[1]
                and (values[2] == "linear" or values[0] > 0)
            )
            if not ok:
                raise KilnError(
                    f"sweep axis {key!r}: {values!r} is not (lo, hi, 'log' | 'linear') with"
                    " lo < hi (and lo > 0 for 'log'), e.g. (1e-4, 1e-2, 'log')."
                )
        elif isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise KilnError(f"sweep axis {key!r} needs a non-empty list of values; got {values!r}.")


# Loading and checking the points of an experiment file.


def _load_module(path: str) -> Any:
    return config_lib.load_module(path, f"kiln_sweep_{abs(hash(path))}")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def fields_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Dotted key -> default value of every leaf field of `config`."""
    return _flatten(config.to_dict())


def _check_value(key: str, value: Any, default: Any, where: str) -> Any:
    """`value` as the type of the field (an int for a float field becomes a float)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()  # np.float64(1e-3), np.int64(2) from np.logspace & co.
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str)
    else:
        raise KilnError(
            f"{where}: {key} is {a_type(default)} field ({default!r}); a sweep sets"
            " only int, float, str and bool fields."
        )
    if not ok:
        raise KilnError(
            f"{where}: {key}={value!r} is {a_type(value)}, but {key} is {a_type(default)} field"
            f" (default {default!r}); give {TYPE_NAMES[type(default)]}."
        )
    return value


def check_key(key: Any, fields: dict[str, Any], where: str) -> None:
    if not isinstance(key, str) or key not in fields:
        near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise KilnError(f"{where}: key {key!r} is not in the config.{hint}")


def load_points(spec: str) -> tuple[ml_collections.ConfigDict, list[Point]]:
    """The experiment's locked config and its checked sweep points."""
    path, _, arg = spec.partition(":")
    module = _load_module(path)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise KilnError(
            f"{path} has no get_sweep(); add one returning a list of override dicts, e.g."
            ' `return sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})`.'
        )
    config = config_lib.load_config(spec)
    takes_arg = bool(inspect.signature(get_sweep).parameters)
    try:
        raw = get_sweep(arg or None) if takes_arg else get_sweep()
    except KilnError:
        raise
    except Exception as e:  # The experiment file's own code: the user's to fix.
        raise KilnError(
            f"{path}: get_sweep() failed: {type(e).__name__}: {' '.join(str(e).split())}. Fix"
            " get_sweep in that file (or the arguments after the ':')."
        ) from None
    if not isinstance(raw, list | tuple) or not raw:
        raise KilnError(f"{path}: get_sweep() returned {raw!r}; return a non-empty list of dicts.")
    fields = fields_of(config)
    points = []
    for i, point in enumerate(raw):
        where = f"{path}: sweep point {i} {point!r}"
        if not isinstance(point, dict):
            raise KilnError(f"{where} is not a dict of dotted keys to values.")
        checked = {}
        for key, value in point.items():
            check_key(key, fields, where)
            checked[key] = _check_value(key, value, fields[key], where)
        points.append(checked)
    names(points)  # Two points with the same name would share a workdir.
    return config, points


def points(spec: str) -> list[Point]:
    """The checked override dicts of `get_sweep()` in the experiment file of `spec`
    (`path/to/file.py[:args]`): every key a field of the config, every value of its type."""
    return load_points(spec)[1]


def format_value(value: Any) -> str:
    """A value as `--config.key=<value>` takes it (ml_collections parses by the field's type)."""
    return repr(value) if isinstance(value, float) else str(value)


def point_name(overrides: Point) -> str:
    """A readable, filesystem-safe workdir name: {"optim.lr": 0.001, "seed": 0} ->
    `lr=0.001_seed=0` (the full dotted key where two keys end alike)."""
    if not overrides:
        return "default"
    last = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = []
    for key, short in zip(overrides, last):
        label = short if last.count(short) == 1 else key
        parts.append(f"{label}={format_value(overrides[key])}")
    name = _UNSAFE.sub("-", "_".join(parts)).strip(".-") or "point"
    if len(name) > _MAX_NAME:
        digest = hashlib.md5(name.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_NAME - 9]}_{digest}"
    return name


def names(points: list[Point]) -> list[str]:
    """Each point's `point_name`; two points with the same name are an error."""
    out = [point_name(p) for p in points]
    seen: dict[str, int] = {}
    for i, name in enumerate(out):
        if name in seen:
            raise KilnError(
                f"sweep points {seen[name]} {points[seen[name]]!r} and {i} {points[i]!r} both"
                f" get the workdir name {name!r}; make the points differ (a repeated point?)."
            )
        seen[name] = i
    return out
