"""A run's workdir: the names of its files, the check that a resumed run is the same run, and
the summary. Every module that reads or writes a workdir takes the names from here.

    <workdir>/config.json      the resolved config (read back on resume and by fine-tunes)
    <workdir>/tokenizer.model  the sentencepiece model every later stage uses (kiln-trained)
    <workdir>/tokenizer/       or: an imported Hugging Face tokenizer's files (tokenizer.json
                               or spiece.model, tokenizer_config.json, ...)
    <workdir>/checkpoints/N    orbax: train state and data iterator position at step N
    <workdir>/metrics.jsonl    one line per logged step; tensorboard/ holds the same
    <workdir>/summary.json     final metrics, written when the run ends
"""

import json
import os
from typing import Any

import ml_collections

from kiln import config_lib
from kiln.errors import KilnError

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
TOKENIZER_DIR = "tokenizer"
# The files that make a directory a Hugging Face tokenizer (kiln.data.hf_tokenizer).
HF_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SUMMARY = "summary.json"
PREDICTIONS = "predictions_test.jsonl"

# Sections that define what a run computes: a resumed run may change anything else (steps,
# learning rate, evaluation, checkpointing, mesh) but not these.
RUN_IDENTITY = ("seed", "model", "tokenizer", "data", "objective", "task")
# Model fields that change how, not what, the run computes: a resumed run may change them.
HOW_NOT_WHAT = ("remat", "scan_layers")


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Creates the workdir and writes config.json; a resumed run must keep its identity
    (`RUN_IDENTITY`, but for `HOW_NOT_WHAT`)."""
    import jax  # Here: tools that only read workdirs need not import jax.

    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, CONFIG)
    if os.path.exists(path):
        old, new = config_lib.load_json(path).to_dict(), config_lib.to_dict(config)
        for run_config in (old, new):
            for key in HOW_NOT_WHAT:
                run_config.get("model", {}).pop(key, None)
        changed = config_lib.diff(
            {k: old.get(k) for k in RUN_IDENTITY}, {k: new.get(k) for k in RUN_IDENTITY}
        )
        if changed:
            raise KilnError(
                f"{workdir} holds a different run; differing keys: {changed}. Use a new"
                " --workdir, or restore those values to resume the existing run."
            )
    if jax.process_index() == 0:
        config_lib.save_json(config, path)


def find_tokenizer(workdir: str | os.PathLike) -> str | None:
    """The tokenizer of `workdir`: its tokenizer.model (kiln-trained), else its tokenizer/
    directory (imported), else the workdir itself if it is a Hugging Face tokenizer directory
    (a save_pretrained checkpoint); None if it has none. A directory with a tokenizer.json is
    an HF one even beside a tokenizer.model (Llama checkpoints ship both)."""
    if os.path.isfile(os.path.join(workdir, HF_TOKENIZER_FILES[0])):
        return str(workdir)
    candidates = [os.path.join(workdir, TOKENIZER), os.path.join(workdir, TOKENIZER_DIR)]
    for path in candidates:
        if os.path.isfile(path) or _is_hf_tokenizer(path):
            return path
    return str(workdir) if _is_hf_tokenizer(workdir) else None


def tokenizer_path(workdir: str | os.PathLike) -> str:
    """`find_tokenizer(workdir)`, or a KilnError naming what was expected there."""
    path = find_tokenizer(workdir)
    if path is None:
        raise KilnError(
            f"No tokenizer in {workdir}: expected {TOKENIZER} (a tokenizer kiln trained) or a"
            f" {TOKENIZER_DIR}/ directory with {' or '.join(HF_TOKENIZER_FILES)} (an imported"
            " one). Point at a run that finished setting up, or copy the tokenizer there."
        )
    return path


def _is_hf_tokenizer(path: str | os.PathLike) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in HF_TOKENIZER_FILES)


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
    """summary.json, written by process 0 only, atomically."""
    import jax

    if jax.process_index() == 0:
        config_lib.write_atomically(os.path.join(workdir, SUMMARY), json.dumps(summary, indent=2))


def read_summary(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's summary.json, or None if it has none (yet) or it cannot be read."""
    try:
        with open(os.path.join(workdir, SUMMARY)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run_finished(workdir: str | os.PathLike, steps: int) -> bool:
    """Whether the run in `workdir` finished: its summary.json is at step `steps` (a run that
    stopped early with train.stop_after, or never ended, has none or an earlier one)."""
    summary = read_summary(workdir)
    return summary is not None and summary.get("step") == steps


def first_perplexity(workdir: str) -> float | None:
    """Validation perplexity at step 0 from metrics.jsonl (kept across resumes)."""
    path = os.path.join(workdir, METRICS)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] == 0 and "validation/perplexity" in row:
                return row["validation/perplexity"]
    return None
