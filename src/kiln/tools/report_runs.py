"""`kiln.tools.report`'s inputs: the runs of a sweep, pipeline or run workdir, their
summaries and metrics.jsonl curves, and how values print."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from kiln.errors import KilnError


@dataclasses.dataclass
class Run:
    name: str
    path: str
    overrides: dict[str, Any]  # a sweep point's overrides; {} otherwise
    summary: dict[str, Any] | None  # summary.json; None while unfinished


@dataclasses.dataclass
class Workdir:
    kind: str  # sweep | pipeline | run
    path: str
    runs: list[Run]
    spec: str = ""  # a sweep's --config
    select: str = ""  # a pipeline's comparison metric


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise KilnError(f"{path} cannot be read ({e.strerror or e}).") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError.
        raise KilnError(f"{path} is not valid JSON ({e}); re-run the run that wrote it.") from None


def read_object(path: str) -> dict[str, Any]:
    """The JSON object in `path`; a KilnError if it holds anything else."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise KilnError(
            f"{path} holds a JSON {type(value).__name__}, not an object; re-run the command that"
            " wrote it."
        )
    return value


def _run(name: str, path: str, overrides: dict[str, Any] | None = None) -> Run:
    summary_path = os.path.join(path, "summary.json")
    summary = read_object(summary_path) if os.path.isfile(summary_path) else None
    return Run(name, path, overrides or {}, summary)


def _is_run(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("summary.json", "config.json"))


def load(path: str) -> Workdir:
    """The runs of a sweep, pipeline or single-run workdir, in their natural order."""
    if not os.path.isdir(path):
        raise KilnError(f"{path} is not a directory; give a sweep, pipeline or run workdir.")
    sweep_path = os.path.join(path, "sweep.json")
    if os.path.isfile(sweep_path):
        sweep = read_object(sweep_path)
        try:
            points = [(p["name"], p["overrides"]) for p in sweep["points"]]
            if not all(isinstance(n, str) and isinstance(o, dict) for n, o in points):
                raise TypeError("a point's name is not a string or its overrides not an object")
            runs = [_run(name, os.path.join(path, name), overrides) for name, overrides in points]
        except (KeyError, TypeError) as e:
            raise KilnError(
                f"{sweep_path} is not a kiln.tools.sweep record (points with name and overrides:"
                f" {e!r}); re-run kiln.tools.sweep to rewrite it."
            ) from None
        return Workdir("sweep", path, runs, spec=sweep.get("config", ""))
    if _is_run(path):
        return Workdir("run", path, [_run(os.path.basename(os.path.normpath(path)), path)])
    comparison_path = os.path.join(path, "comparison.json")
    comparison = read_object(comparison_path) if os.path.isfile(comparison_path) else {}
    named = comparison.get("stages", {})
    if not isinstance(named, dict | list) or not all(isinstance(n, str) for n in named):
        raise KilnError(
            f"{comparison_path} is not a pipeline's comparison (its stages are not named);"
            " re-run the pipeline to rewrite it."
        )
    stages = list(named) or sorted(
        name for name in os.listdir(path) if _is_run(os.path.join(path, name))
    )
    if not stages:
        raise KilnError(
            f"{path} holds no run: no sweep.json (kiln.tools.sweep), comparison.json or stage"
            " folders (a pipeline), nor summary.json/config.json (a run). Give the workdir that"
            " kiln.tools.sweep or kiln.main wrote."
        )
    runs = [_run(name, os.path.join(path, name)) for name in stages]
    return Workdir("pipeline", path, runs, select=comparison.get("select", ""))


def numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def fmt(value: Any) -> str:
    """A table cell: floats to 7 significant digits (1e-6 relative), the rest as they are."""
    if isinstance(value, float):
        return f"{value:.7g}"
    return "" if value is None else str(value)


def value_text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else fmt(value)


def rows(run: Run) -> list[dict[str, Any]]:
    path = os.path.join(run.path, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # A line cut short by a kill; the rest is good.
                if isinstance(row, dict) and numeric(row.get("step")):
                    rows.append(row)
    except OSError as e:
        raise KilnError(f"{path} cannot be read ({e.strerror or e}).") from None
    return rows


def curve(run: Run, key: str) -> tuple[list[int], list[float]]:
    """`key` against the step from metrics.jsonl; a step logged twice (a resumed run repeats the
    steps after its last checkpoint) keeps its last value."""
    points = {row["step"]: row[key] for row in rows(run) if numeric(row.get(key))}
    steps = sorted(points)
    return steps, [points[s] for s in steps]
