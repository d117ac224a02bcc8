"""Command line: `python -m kiln.main --config experiments/<file>.py:<args> --workdir runs/<name>`.

Override any config field with `--config.section.key=value`; the config is locked, so a
misspelt key fails and names the nearest valid one. Re-running the same command resumes.
"""

import ast
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from kiln import host_memory
from kiln.errors import KilnError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
flags.mark_flags_as_required(["config", "workdir"])

USAGE = (
    "Usage: python -m kiln.main --config experiments/<file>.py[:args] --workdir DIR"
    " [--config.section.key=value ...]"
)


def _one_paragraph(error: BaseException) -> str:
    """ml_collections wraps messages in reprs and newlines; unwrap them into one line."""
    text = str(error)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return " ".join(text.replace("\\n", " ").split())


def _fail(message: str) -> None:
    print(f"kiln: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config mistakes reported in one paragraph instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, KilnError) as e:
        _fail(f"bad command line: {_one_paragraph(e)}\n{USAGE}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}.\n{USAGE}")
    host_memory.keep_freed_memory()  # Process-wide, so here and not on import: before JAX starts.
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO.
    try:
        config = _CONFIG.value
        config.to_dict()  # A file that failed to load raises here, not at import time.
    except OSError as e:
        _fail(f"{_one_paragraph(e)}\n{USAGE}")
    try:
        from kiln import distributed, pipelines  # Before anything touches the JAX backend.

        first = config[config.stages[0]] if pipelines.is_pipeline(config) else config
        distributed.maybe_initialize(first.distributed)
        from kiln import run

        if pipelines.is_pipeline(config):
            pipelines.run_pipeline(config, _WORKDIR.value)
        else:
            run.train_and_evaluate(config, _WORKDIR.value)
    except KilnError as e:
        _fail(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
