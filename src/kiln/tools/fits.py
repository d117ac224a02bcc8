"""Will a config fit? Compile its train step ahead of time and report memory per device.

  python -m kiln.tools.fits --config experiments/gpt/pretrain.py:size=1b [--config.key=value ...]

The real jitted, sharded, donated train step is lowered and compiled for abstract inputs (no
parameters are allocated) on this machine's devices, with the config's mesh. The batch has the
shapes of the run's: pre-training rows of random tokens through the run's own objective
(`inputs.make_objective`), or a fine-tune's first task examples through its task encoder
(`inputs.task_data`), both with a stand-in for the tokenizer (kiln's special ids, one id per
word; no tokenizer is trained or read). A pipeline config is reported stage by stage.
XLA's memory analysis gives the bytes per device of the arguments (state and batch shard), the
outputs, the temporaries and the donated (aliased) buffers; the estimate is arguments + outputs
+ temporaries - aliased. Where the device reports its memory (GPUs, TPUs) the command exits 1
if the estimate exceeds it, before any long run starts.
"""

import contextlib
import io
import sys
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from kiln import (
    build,
    checkpoint,
    finetuning,
    inputs,
    pipelines,
    sharding,
    validation,
)
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.tools import cli, host_memory


class _Pieces:
    """Stands in for a trained SentencePiece model of kiln's layout (`kiln.data.tokenizer`) with
    `vocab_size` pieces: every word of a text is one ordinary id. Batches need only the shapes."""

    SPECIAL = ("<pad>", "<unk>", "<s>", "</s>", *tokenizer_lib.CONTROL_SYMBOLS)

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def get_piece_size(self) -> int:
        return self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        byte = token_id - tokenizer_lib.NUM_SPECIAL_IDS
        if byte < 0:
            return self.SPECIAL[token_id]
        return f"<0x{byte:02X}>" if byte < tokenizer_lib.NUM_BYTE_PIECES else f"\u2581w{token_id}"

    def encode(self, text: str | Sequence[str]) -> list[int] | list[list[int]]:
        if not isinstance(text, str):
            return [self.encode(t) for t in text]
        first = tokenizer_lib.NUM_SPECIAL_IDS
        ordinary = self.vocab_size - first
        return [first + zlib.crc32(word.encode()) % ordinary for word in text.split()]


def stand_in_tokenizer(vocab_size: int) -> tokenizer_lib.Tokenizer:
    """A kiln Tokenizer (its special ids) over `_Pieces`: enough to build batches of any shape."""
    return tokenizer_lib.Tokenizer(_Pieces(vocab_size), "stand-in")


def synthetic_batch(config: ml_collections.ConfigDict, rows: int, seed: int) -> dict[str, Any]:
    """A batch of `rows` rows as the run's data code makes it: random ordinary tokens, one
    document per row, through the run's objective; for a fine-tune, its task's first examples
    through the task encoder."""
    tok = stand_in_tokenizer(config.model.vocab_size)
    if config.task.name:
        small = config.copy_and_resolve_references()
        small.data.global_batch_size, small.seed = rows, seed
        small.task.train_examples, small.task.eval_examples = rows, 1
        with contextlib.redirect_stdout(io.StringIO()):  # Its counts describe these few rows.
            task = finetuning.load(config.task, config.data.data_dir)
            return next(inputs.task_data(small, task, tok).train_iter)
    objective = inputs.make_objective(config, tok)
    length = objective.packed_length(config.data.seq_len)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(
        tokenizer_lib.NUM_SPECIAL_IDS, config.model.vocab_size, size=(rows, length), dtype=np.int32
    )
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    packed = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}
    return objective(packed, rng)


def memory_report(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Bytes per device of the compiled train step (see the module docstring) and the device's
    memory (0 where it does not say)."""
    mesh_shape = validation.validate(config, jax.device_count(), jax.process_count())
    classes = 0
    if config.task.name:
        task = finetuning.load(config.task, config.data.data_dir)
        classes = finetuning.num_classes(config.model.family, task)
    built = build.build(config, classes)
    mesh, abstract, shardings = built.mesh, built.abstract, built.shardings
    rows = config.data.global_batch_size
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in synthetic_batch(config, rows, 0).items()
    }
    state = checkpoint.abstract_like(abstract, shardings)
    compiled = built.train_step.lower(state, batch).compile()
    analysis = compiled.memory_analysis()
    sizes = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "temporaries": analysis.temp_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
    }
    stats = jax.local_devices()[0].memory_stats() or {}
    return {
        **sizes,
        "estimate": sizes["arguments"] + sizes["outputs"] + sizes["temporaries"] - sizes["aliased"],
        "device_limit": int(stats.get("bytes_limit", 0)),
        "parameters": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params)),
        "mesh": mesh_shape,
        "device": jax.local_devices()[0].device_kind,
    }


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB"


def describe(report: dict[str, Any]) -> str:
    lines = [
        f"Train step per device ({report['device']}, mesh (data, fsdp, tensor) ="
        f" {report['mesh']}, {report['parameters']:,} parameters):",
        *(
            f"  {key:<12} {_gib(report[key])}"
            for key in ("arguments", "outputs", "temporaries", "aliased", "estimate")
        ),
    ]
    limit = report["device_limit"]
    if limit:
        verdict = "fits" if report["estimate"] <= limit else "does NOT fit"
        lines.append(f"  device has  {_gib(limit)}: {verdict}")
    else:
        lines.append("  the device does not report its memory (CPU): compare with host RAM")
    return "\n".join(lines)


def _stages(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
    """(name, run config) of each stage of a pipeline; ("", config) for a single run."""
    if pipelines.is_pipeline(config):
        return [(name, config[name]) for name in config.stages]
    return [("", config)]


PROG = "kiln.tools.fits"
USAGE = "Usage: python -m kiln.tools.fits --config experiments/<file>.py[:args] [--config.k=v ...]"


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        print(f"{PROG}: error: unexpected arguments {argv[1:]}.\n{USAGE}", file=sys.stderr)
        sys.exit(2)
    host_memory.keep_freed_memory()  # Process-wide, so here and not on import: before JAX starts.
    sys.exit(cli.run(PROG, lambda: _report_all(_CONFIG.value)))


def _report_all(config: ml_collections.ConfigDict) -> int:
    """Prints each stage's report; 1 if one does not fit the device, else 0."""
    too_big = False
    for name, stage in _stages(config):
        try:
            report = memory_report(stage)
        except KilnError as e:
            raise KilnError(f"pipeline stage {name!r}: {e}" if name else str(e)) from None
        print(f"Stage {name}: {describe(report)}" if name else describe(report), flush=True)
        too_big |= bool(report["device_limit"]) and report["estimate"] > report["device_limit"]
    return 1 if too_big else 0


if __name__ == "__main__":
    from absl import app, flags

    _CONFIG = cli.define_config_flag()
    flags.mark_flags_as_required(["config"])
    app.run(_main, flags_parser=lambda argv: cli.parse_flags(argv, PROG, USAGE))
