"""Hugging Face checkpoints in and out of kiln.

  python -m kiln.tools.convert --from-hf path/to/gpt2 --out runs/gpt2
  python -m kiln.tools.convert --to-hf --workdir runs/ft --out exported/ft [--step N]

--from-hf reads a local save_pretrained directory (config.json, model.safetensors or its
shards, else flax_model.msgpack or pytorch_model.bin, and the tokenizer files) and writes a
finished kiln run: config.json, tokenizer/, checkpoints/0 (`kiln.hf.checkpoints`). Fine-tune it
like any run, e.g. `--config experiments/finetune.py:from=runs/gpt2,task=wn_lexname`.
--to-hf writes a run's checkpoint (the latest, or --step) as config.json + model.safetensors
and its tokenizer, which transformers loads with `from_pretrained(dir)` (the Auto class is
printed). Supported: GPT-2, Llama, BERT and T5 (`kiln.hf.ARCHITECTURES`); no network is used.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kiln import checkpoint, finetuning, metrics, models, restore
from kiln import hf as hf_lib
from kiln import workdir as workdir_lib
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.hf import AUTO_CLASSES, checkpoints, files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.convert",
        description="Import a Hugging Face checkpoint into kiln, or export a kiln run to one.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", metavar="DIR", help="HF save_pretrained directory to import")
    mode.add_argument("--to-hf", action="store_true", help="export --workdir to --out")
    p.add_argument("--workdir", help="--to-hf: the kiln run (or <workdir>/checkpoints/<step>)")
    p.add_argument("--step", type=int, default=-1, help="--to-hf: checkpoint step; -1 = latest")
    p.add_argument(
        "--out", required=True, help="the kiln workdir (import) or HF directory (export)"
    )
    return p


def import_hf(hf_dir: str, out: str) -> checkpoints.Imported:
    """Imports `hf_dir` as a finished kiln run in `out`."""
    imported = checkpoints.load(hf_dir)
    checkpoints.write_workdir(imported, out)
    count = sum(x.size for x in jax.tree.leaves(imported.params))
    tokenizer = workdir_lib.find_tokenizer(out) is not None
    metrics.log(
        f"Imported {imported.hf_dir} (HF model_type {imported.hf_config['model_type']!r}) ->"
        f" {os.path.abspath(out)}: model.family={imported.model.family!r}, {count:,}"
        f" parameters; tokenizer: {'yes' if tokenizer else 'none'}; HF tensors not used:"
        f" {list(imported.unused) or 'none'}. Fine-tune it with init_from.workdir={out}."
    )
    return imported


def export_hf(workdir: str, out: str, step: int = -1) -> dict[str, Any]:
    """Writes the checkpoint of the kiln run `workdir` (latest, or `step`) to `out` as an HF
    directory; returns its config.json."""
    if os.path.exists(os.path.join(out, files.CONFIG)):
        raise KilnError(f"--out {out} already holds a {files.CONFIG}; choose a new directory.")
    spec = ml_collections.ConfigDict({"workdir": workdir, "step": step, "hf": ""})
    source = restore.resolve(spec, where="--")
    if "model" not in source.config:
        raise KilnError(f"--workdir {workdir} is a pipeline; name one of its stages' workdirs.")
    params = read_params(source)
    model = source.config.model.to_dict()
    found = workdir_lib.find_tokenizer(source.workdir)
    tok = None if found is None else tokenizer_lib.load_tokenizer(found)
    ids = checkpoints.token_ids(source.workdir, tok, model["family"])
    hf_config, tensors = checkpoints.export(model, params, ids)
    files.write(out, hf_config, tensors)
    if tok is not None:
        tokenizer_lib.save_tokenizer(tok, out)
    tokenizer = "written" if tok is not None else f"none ({source.workdir} has none)"
    hf_class = hf_config["architectures"][0]
    metrics.log(
        f"Exported {source.workdir} step {source.step} -> {os.path.abspath(out)} ({hf_class};"
        f" tokenizer: {tokenizer}). Load it with transformers."
        f"{AUTO_CLASSES.get(hf_class, hf_class)}.from_pretrained({out!r})."
    )
    return hf_config


def read_params(source: restore.Source) -> dict[str, Any]:
    """The parameters of `source`'s checkpoint as NumPy arrays: an import's recorded tree, else
    the run's model (with its classification head for a fine-tune that trains one)."""
    shapes = checkpoints.param_shapes(source.workdir)
    if shapes is not None:
        abstract = {p: jax.ShapeDtypeStruct(s, np.float32) for p, s in shapes.items()}
    else:
        abstract = _run_shapes(source.config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = hf_lib.nest(
        {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device) for p, x in abstract.items()}
    )
    ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
    try:
        params = ckpt.restore_params(source.step, target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise KilnError(
            f"--workdir {source.workdir} step {source.step}: its checkpoint does not hold the"
            f" parameters its config.json describes ({e}). Export the run the checkpoint belongs"
            " to, unchanged."
        ) from e
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, params)


def _run_shapes(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The parameter shapes of a kiln run's model (a fine-tune's head included)."""
    classes = 0
    if config.task.name:
        task = finetuning.load(config.task, config.data.data_dir)
        classes = finetuning.num_classes(config.model.family, task)
    model = models.build_model(config.model, classes, config.task.pooling)
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **example)["params"])
    return hf_lib.flatten(nn.unbox(boxed))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.from_hf:
            import_hf(args.from_hf, args.out)
        else:
            if not args.workdir:
                raise KilnError("--to-hf needs --workdir: the kiln run to export.")
            export_hf(args.workdir, args.out, args.step)
    except KilnError as e:
        print(f"kiln.tools.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
