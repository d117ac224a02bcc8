"""Will a config fit? Compile its train step ahead of time and report memory per device.

  python -m kiln.fits --config experiments/gpt/pretrain.py:size=1b [--config.key=value ...]

The real jitted, sharded, donated train step is lowered and compiled for abstract inputs (no
parameters are allocated, no data is read) on this machine's devices, with the config's mesh.
XLA's memory analysis gives the bytes per device of the arguments (state and batch shard), the
outputs, the temporaries and the donated (aliased) buffers; the estimate is arguments + outputs
+ temporaries - aliased. Where the device reports its memory (GPUs, TPUs) the command exits 1
if the estimate exceeds it, before any long run starts.
"""

import sys
from typing import Any

import jax
import ml_collections
import numpy as np

from kiln import checkpoint, config_lib, models, optim, sharding, train
from kiln.data import objectives
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError


def synthetic_batch(config: ml_collections.ConfigDict, rows: int, seed: int) -> dict[str, Any]:
    """Random ordinary tokens, one document per row, through the config's real objective."""
    seq_len, vocab = config.data.seq_len, config.model.vocab_size
    specials = tokenizer_lib.NUM_SPECIAL_IDS
    mask_id = tokenizer_lib.EOS_ID + 1 + tokenizer_lib.CONTROL_SYMBOLS.index("[MASK]")
    sentinels = tuple(range(specials - 100, specials))
    objective = {
        "causal_lm": lambda: objectives.CausalLM(),
        "mlm": lambda: objectives.MaskedLM(mask_id=mask_id, vocab_size=vocab),
        "span_corruption": lambda: objectives.SpanCorruption(
            seq_len, sentinels, tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID
        ),
    }[config.objective.name]()
    length = objective.packed_length(seq_len)
    rng = np.random.default_rng(seed)
    tokens = rng.integers(specials, vocab, size=(rows, length), dtype=np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    packed = {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}
    return objective(packed, rng)


def memory_report(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Bytes per device of the compiled train step (see the module docstring) and the device's
    memory (0 where it does not say)."""
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    model = models.build_model(config.model)
    schedule = optim.make_schedule(config.optim, config.train.steps)
    optimizer = optim.make_optimizer(config.optim, config.train.steps, config.model.n_layers)
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train.state_shardings(model, optimizer, mesh, config.data.seq_len)
    train_step, _ = train.jit_steps_for(config, model, optimizer, schedule, shardings, mesh)
    rows = config.data.global_batch_size
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
        for k, v in synthetic_batch(config, rows, 0).items()
    }
    state = checkpoint.abstract_like(abstract, shardings)
    compiled = train_step.lower(state, batch).compile()
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


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"kiln.fits: error: unexpected arguments {argv[1:]}")
    try:
        report = memory_report(_CONFIG.value)
    except KilnError as e:
        print(f"kiln.fits: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(describe(report))
    if report["device_limit"] and report["estimate"] > report["device_limit"]:
        sys.exit(1)


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    _CONFIG = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file.", lock_config=True
    )
    flags.mark_flags_as_required(["config"])

    def _parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, AttributeError, KeyError, TypeError, ValueError, KilnError) as e:
            print(f"kiln.fits: error: {' '.join(str(e).split())}", file=sys.stderr)
            sys.exit(2)

    app.run(_main, flags_parser=_parse)
