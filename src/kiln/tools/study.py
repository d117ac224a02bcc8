"""A reproduction study's results: one JSON file (the raw numbers, committed as
docs/reproduction.json) updated run by run, with the document rendered from it on every save
(`kiln.tools.reproduction_doc`)."""

from __future__ import annotations

import datetime
import json
import os
import platform
from typing import Any

from kiln.errors import KilnError
from kiln.tools import report_runs

CURVE_POINTS = 100  # pre-training loss points kept per seed in the JSON


class Study:
    """The results JSON of one size, updated cell by cell (and the document rendered from it)."""

    def __init__(self, path: str, size: str, command: str):
        self.path, self.size = path, size
        self.data: dict[str, Any] = {"size": size, "pipelines": {}}
        if os.path.exists(path):
            with open(path) as f:
                self.data = json.load(f)
            if self.data.get("size") != size:
                raise KilnError(
                    f"{path} holds the study at size={self.data.get('size')!r}, not {size!r};"
                    " give another --results file (or delete this one to start over)."
                )
        self.data["command"] = command
        self.data["machine"] = machine()

    def entry(self, name: str) -> dict[str, Any]:
        return self.data["pipelines"].setdefault(
            name, {"runs": [], "baselines": [], "pretrain": []}
        )

    def has_cell(self, name: str, seed: int, labels: int, arms: set[str], print_: str) -> bool:
        """Whether the JSON holds `arms` of this cell, measured under fingerprint `print_`."""
        found = {
            r["arm"]
            for r in self.entry(name)["runs"]
            if (r["seed"], r["labels"], r.get("fingerprint")) == (seed, labels, print_)
        }
        return arms <= found

    def put(self, key: str, name: str, row: dict[str, Any], same: tuple[str, ...]) -> None:
        """Adds `row` to the pipeline's `key` list, replacing a row equal on the `same` fields."""
        rows = self.entry(name)[key]
        rows[:] = [r for r in rows if any(r.get(k) != row.get(k) for k in same)] + [row]
        rows.sort(key=lambda r: tuple(str(r.get(k)).zfill(12) for k in same))

    def save(self) -> None:
        """Writes the JSON (atomically) and renders the document and plots beside it."""
        from kiln import config_lib
        from kiln.tools import reproduction_doc

        self.data["updated"] = datetime.date.today().isoformat()
        text = json.dumps(self.data, indent=1, sort_keys=True) + "\n"
        config_lib.write_atomically(self.path, text)
        reproduction_doc.write(self.data, os.path.splitext(self.path)[0] + ".md")


def machine() -> str:
    """The machine in words: architecture, CPU cores, jax version and backend."""
    import jax

    backend = jax.default_backend()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} ({backend})"


def pretrain_curve(workdir: str) -> dict[str, list[float]]:
    """Training and validation loss against step from a run's metrics.jsonl (a step that a
    resumed run logged again keeps its last value), thinned to at most CURVE_POINTS points
    each."""
    run = report_runs.Run(name="pretrain", path=workdir, overrides={}, summary=None)
    train, valid = (
        list(zip(*report_runs.curve(run, key), strict=True))
        for key in ("train/loss", "validation/loss")
    )

    def thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
        every = max(1, -(-len(points) // CURVE_POINTS))
        kept = points[::every]
        return kept if not points or kept[-1] == points[-1] else [*kept, points[-1]]

    train, valid = thin(train), thin(valid)
    return {
        "steps": [s for s, _ in train],
        "loss": [v for _, v in train],
        "validation_steps": [s for s, _ in valid],
        "validation_loss": [v for _, v in valid],
    }
