"""Command line: `python -m kiln.main --config experiments/<file>.py:<args> --workdir runs/<name>`.

Override any config field with `--config.section.key=value`; the config is locked, so a
misspelt key fails and names the nearest valid one. Re-running the same command resumes.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from kiln.errors import KilnError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    try:
        from kiln import distributed  # Before anything touches the JAX backend.

        distributed.maybe_initialize(config.distributed)
        from kiln import run

        run.train_and_evaluate(config, _WORKDIR.value)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
