"""Hugging Face checkpoints in and out of kiln.

  python -m kiln.tools.convert --from-hf path/to/gpt2 --out runs/gpt2
  python -m kiln.tools.convert --to-hf --workdir runs/ft --out exported/ft [--step N]
  python -m kiln.tools.convert --merge --workdir runs/lora --out runs/lora_merged [--step N]

--from-hf reads a local save_pretrained directory (config.json, model.safetensors or its
shards, else flax_model.msgpack or pytorch_model.bin, and the tokenizer files) and writes a
finished kiln run: config.json, tokenizer/, checkpoints/0 (`kiln.hf.checkpoints`). Fine-tune it
like any run, e.g. `--config experiments/finetune.py:from=runs/gpt2,task=wn_lexname`.
--to-hf writes a run's checkpoint (the latest, or --step) as config.json + model.safetensors
and its tokenizer, which transformers loads with `from_pretrained(dir)` (the Auto class is
printed). Supported: GPT-2, Llama, BERT and T5 (`kiln.hf.ARCHITECTURES`); no network is used.
--merge folds a LoRA run's adapters into its base (kernel + alpha / rank * A.B) and writes a
plain kiln run (config.json with LoRA off, tokenizer, checkpoints/<step> holding the whole
parameter tree, the task head included), which --to-hf exports and init_from fine-tunes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from kiln import checkpoint, config_lib, finetuning, metrics, models, peft, restore, sharding
from kiln import hf as hf_lib
from kiln import workdir as workdir_lib
from kiln.data import objectives
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.hf import AUTO_CLASSES, checkpoints, files
from kiln.models import adapters


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.convert",
        description="Import a Hugging Face checkpoint into kiln, or export a kiln run to one.",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--from-hf", metavar="DIR", help="HF save_pretrained directory to import")
    mode.add_argument("--to-hf", action="store_true", help="export --workdir to --out")
    mode.add_argument(
        "--merge", action="store_true", help="fold --workdir's LoRA adapters into a plain run"
    )
    p.add_argument(
        "--workdir", help="--to-hf/--merge: the kiln run (or <workdir>/checkpoints/<step>)"
    )
    p.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = latest")
    p.add_argument(
        "--out",
        required=True,
        help="the kiln workdir (import, merge) or HF directory (export)",
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
    objective = source.config.get("objective", {}).get("name", "")
    if objective in objectives.MODULE_OBJECTIVES and not source.config.task.name:
        raise KilnError(
            f"--workdir {workdir} pre-trained with objective.name={objective!r}: its body has no"
            " language-model head for an HF model class to carry. Fine-tune it (init_from.workdir="
            f"{workdir}) and export the fine-tuned run."
        )
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


def merge_lora(workdir: str, out: str, step: int = -1) -> str:
    """Writes the LoRA run `workdir` (latest checkpoint, or `step`) with its adapters folded into
    the base as a plain kiln run in `out`; returns `out`."""
    spec = ml_collections.ConfigDict({"workdir": workdir, "step": step, "hf": ""})
    source = restore.resolve(spec, where="--")
    lora = peft.spec(source.config)
    if not lora.lora_rank:
        raise KilnError(f"--merge: {source.workdir} has no LoRA adapters (finetune.lora.rank=0).")
    if lora.prompt_length:
        raise KilnError(
            f"--merge: {source.workdir} also learned a soft prompt (finetune.prompt_tuning),"
            " which a plain model has no place for. Evaluate or sample that run itself."
        )
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise KilnError(f"--out {out} exists and is not empty; choose a new directory.")
    mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
    mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:1])
    classes, pooling = _head(source.config)
    _, params = restore.params_for_inference(source, mesh, classes, pooling)
    merged = adapters.merge_lora(jax.tree.map(np.asarray, params), lora.lora_rank, lora.lora_alpha)
    os.makedirs(out, exist_ok=True)
    found = workdir_lib.find_tokenizer(source.workdir)
    if found is not None:
        copy = shutil.copytree if os.path.isdir(found) else shutil.copy
        copy(found, os.path.join(out, os.path.basename(found)))
    ckpt = checkpoint.Checkpointer(os.path.join(out, workdir_lib.CHECKPOINTS), async_save=False)
    try:
        ckpt.save(source.step, {"params": jax.tree.map(jax.numpy.asarray, merged)})
    finally:
        ckpt.close()
    config = ml_collections.ConfigDict(source.config.to_dict())
    config.finetune.lora.rank = 0
    # Last: config.json makes the directory a run (an interrupted merge is not one).
    config_lib.save_json(config, os.path.join(out, workdir_lib.CONFIG))
    metrics.log(
        f"Merged {source.workdir} step {source.step} (LoRA rank {lora.lora_rank}) into its"
        f" base -> {out}: a plain run; export it with --to-hf --workdir {out}."
    )
    return out


def _head(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(classes, pooling) of a run's task head; (0, "") without one."""
    if not config.task.name:
        return 0, ""
    task = finetuning.load(config.task, config.data.data_dir)
    return finetuning.num_classes(config.model.family, task), config.task.pooling


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
    classes, pooling = _head(config)
    model = models.build_model(config.model, classes, pooling)
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **example)["params"])
    return hf_lib.flatten(nn.unbox(boxed))


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.from_hf:
            import_hf(args.from_hf, args.out)
        elif not args.workdir:
            mode = "--merge" if args.merge else "--to-hf"
            raise KilnError(f"{mode} needs --workdir: the kiln run to read.")
        elif args.merge:
            merge_lora(args.workdir, args.out, args.step)
        else:
            export_hf(args.workdir, args.out, args.step)
    except KilnError as e:
        print(f"kiln.tools.convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
