"""Where a run's state comes from, in one module. Restore order (logged): this workdir's latest
checkpoint (a resume: state and data position) > `init_from` (another run's parameters, or its
whole state, with regex skips for new heads; step and schedule restart at 0) > scratch.

An `init_from` source is a workdir (its latest checkpoint, or `init_from.step`), a checkpoint
folder `<workdir>/checkpoints/<step>`, or a Hugging Face save_pretrained directory
(`init_from.hf`, imported in memory by `kiln.hf.checkpoints`: parameters only, and the run's
model section must be the checkpoint's). Parameters are matched by path: every parameter of this
run that the source has with the same shape is loaded, unless its path matches
`init_from.skip`; the rest (the new task's heads) keep their fresh initialisation. Checkpoints
always hold per-layer blocks (`on_disk`), whatever `model.scan_layers` says, so runs with and
without it read each other's.

A PEFT run (`kiln.peft`) saves only what it trains; its base (`init_from` or the seed's init,
recorded in `peft.BASE`) is loaded again on resume and for inference, its fingerprint checked.
"""

import dataclasses
import os
import re
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from kiln import build, checkpoint, config_lib, metrics, models, peft, sharding, train
from kiln import workdir as workdir_lib
from kiln.errors import KilnError
from kiln.hf import checkpoints as hf_checkpoints
from kiln.optim import HEAD_MODULES

# Model fields a fine-tune may set differently from the run it starts from.
MAY_DIFFER = ("dropout", "init_std", "dtype", "param_dtype", "remat", "scan_layers")


@dataclasses.dataclass(frozen=True)
class Source:
    """A finished (or checkpointed) run to start from: its workdir, step and config."""

    workdir: str  # For init_from.hf, the HF directory.
    step: int
    config: ml_collections.ConfigDict
    # init_from.hf: the imported per-layer parameters (NumPy); None: `workdir`'s checkpoint.
    params: Any = None

    @property
    def tokenizer_path(self) -> str:
        """The run's tokenizer: its tokenizer.model, an imported tokenizer/ directory, or (for
        init_from.hf) the Hugging Face directory itself (`workdir.tokenizer_path`)."""
        return workdir_lib.tokenizer_path(self.workdir)


def resolve(init_cfg: ml_collections.ConfigDict, where: str = "init_from.") -> Source:
    """The source run and step named by the `init_from` section (errors say what to fix and
    name the options as `where` + workdir / step / hf)."""
    if init_cfg.get("hf", ""):
        if init_cfg.workdir:
            raise KilnError(
                f"{where}hf={init_cfg.hf!r} and {where}workdir={init_cfg.workdir!r} are both set;"
                " a run starts from one source. Clear one of them."
            )
        return hf_source(init_cfg.hf)
    path = os.path.abspath(os.path.expanduser(init_cfg.workdir))
    step = int(init_cfg.step)
    parent = os.path.dirname(path)
    if os.path.basename(parent) == workdir_lib.CHECKPOINTS and os.path.basename(path).isdigit():
        path, step = os.path.dirname(parent), int(os.path.basename(path))
    config_path = os.path.join(path, workdir_lib.CONFIG)
    if not os.path.exists(config_path):
        raise KilnError(
            f"{where}workdir={init_cfg.workdir!r}: no run there ({config_path} is missing)."
            " Point it at a finished run's workdir or at <workdir>/checkpoints/<step>."
        )
    ckpt = checkpoint.Checkpointer(os.path.join(path, workdir_lib.CHECKPOINTS))
    try:
        steps = ckpt.all_steps()
        newest = ckpt.newest_intact(metrics.log) if step < 0 and steps else None
    finally:
        ckpt.close()
    if not steps:
        raise KilnError(
            f"{where}workdir={init_cfg.workdir!r} has no checkpoint yet; finish (or resume)"
            " that run first."
        )
    if step < 0:
        if newest is None:
            raise KilnError(
                f"{where}workdir={init_cfg.workdir!r}: every checkpoint of {path} is damaged"
                f" (steps {sorted(steps)}; see above). Check that run's disk or resume it first."
            )
        step = newest
    elif step not in steps:
        raise KilnError(
            f"{where}step={step}: {path} has checkpoints at steps {sorted(steps)} only."
        )
    return Source(path, step, config_lib.load_json(config_path))


def hf_source(hf_dir: str) -> Source:
    """An HF save_pretrained directory as a source: its parameters mapped to kiln in memory,
    its config the kiln config `kiln.hf.checkpoints.kiln_config` gives."""
    imported = hf_checkpoints.load(hf_dir)
    metrics.log(
        f"Restore: imported {imported.hf_dir} (HF model_type"
        f" {imported.hf_config['model_type']!r}); HF tensors not used:"
        f" {list(imported.unused) or 'none'}"
    )
    config = hf_checkpoints.kiln_config(imported.model)
    return Source(imported.hf_dir, 0, config, imported.params)


def check_architecture(own: ml_collections.ConfigDict, source: Source) -> None:
    """Fails with the list of differing model keys (dropout, dtypes and remat may differ)."""
    mine = {k: v for k, v in config_lib.to_dict(own).items() if k not in MAY_DIFFER}
    theirs = {k: v for k, v in source.config.model.to_dict().items() if k not in MAY_DIFFER}
    if mine.get("family") != theirs.get("family"):
        raise KilnError(
            f"init_from: {source.workdir} is a model.family={theirs.get('family')!r} run; this"
            f" run is {mine.get('family')!r}. Start from a run of the same family."
        )
    changed = config_lib.diff(theirs, mine)
    if changed:
        fix = "Use the source's model section (a pipeline copies it) or start from a matching run."
        if source.params is not None:
            fix = (
                "Take the model section from the checkpoint:"
                " kiln.hf.checkpoints.kiln_config(<HF directory>).model."
            )
        raise KilnError(
            f"init_from: this run's model section differs from {source.workdir}'s"
            f" (source != this run): {changed}. {fix}"
        )


def _flat(tree: Any) -> dict[str, Any]:
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in _leaves(tree)}


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def plan(source: Source, abstract_params: Any, skip: str) -> tuple[list[str], list[str], list[str]]:
    """(loaded, fresh, unused) parameter paths: what this run takes from the source."""
    try:
        pattern = re.compile(skip) if skip else None
    except re.error as e:
        raise KilnError(f"init_from.skip={skip!r} is not a valid regex: {e}.") from e
    source_shapes = _flat(source.params) if source.params is not None else _source_shapes(source)
    target = _flat(abstract_params)
    loaded, fresh = [], []
    for path, leaf in target.items():
        if (pattern and pattern.fullmatch(path)) or path not in source_shapes:
            fresh.append(path)
        elif source_shapes[path].shape != leaf.shape and path.split("/")[0] in HEAD_MODULES:
            fresh.append(path)  # The source's head was for another task (another label set).
        elif source_shapes[path].shape != leaf.shape:
            raise KilnError(
                f"init_from: parameter {path} has shape {source_shapes[path].shape} in"
                f" {source.workdir} but {leaf.shape} here; add it to init_from.skip to"
                " initialise it fresh."
            )
        else:
            loaded.append(path)
    unused = sorted(set(source_shapes) - set(loaded))
    return loaded, fresh, unused


def _source_shapes(source: Source) -> dict[str, Any]:
    """The shapes of the source's parameters: an imported checkpoint's as recorded (a BERT
    import may hold a classifier and no MLM head), else its checkpoint's (with a fine-tuned
    head when it has one)."""
    imported = hf_checkpoints.param_shapes(source.workdir)
    if imported is not None:
        return {path: jax.ShapeDtypeStruct(shape, "float32") for path, shape in imported.items()}
    ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
    try:
        return ckpt.param_shapes(source.step)
    finally:
        ckpt.close()


def _place(array: Any, target: jax.sharding.Sharding) -> jax.Array:
    """A host array (the same on every process) as a global array on `target`."""
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def load_params(source: Source, fresh_params: Any, loaded: list[str]) -> Any:
    """`fresh_params` with the `loaded` paths replaced by the source's values (same shardings)."""
    flat = _flat(fresh_params)
    abstract = {
        path: jax.ShapeDtypeStruct(flat[path].shape, flat[path].dtype, sharding=flat[path].sharding)
        for path in loaded
    }
    if source.params is not None:
        theirs = _flat(source.params)
        restored = {path: _place(theirs[path], abstract[path].sharding) for path in loaded}
    else:
        ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
        try:
            restored = _flat(ckpt.restore_params(source.step, _nest(abstract)))
        finally:
            ckpt.close()
    flat.update({path: restored[path].astype(flat[path].dtype) for path in loaded})
    return jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(fresh_params), [flat[p] for p in _flat(fresh_params)]
    )


def load_state(source: Source, abstract_state: Any) -> Any:
    """The source's whole train state (params and optimizer moments) onto this run's shardings."""
    if source.params is not None or hf_checkpoints.import_record(source.workdir) is not None:
        raise KilnError(
            f"init_from.load='state': {source.workdir} is an imported Hugging Face checkpoint,"
            " which has parameters but no optimizer state. Use init_from.load='params'."
        )
    ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
    try:
        return ckpt.restore(source.step, abstract_state)
    except KilnError as e:
        raise KilnError(
            f"init_from.load='state' needs the same parameters and optimizer as the source: {e}"
            " Use init_from.load='params' to take the parameters only."
        ) from e
    finally:
        ckpt.close()


def on_disk(built: build.Built, state: train.TrainState) -> train.TrainState:
    """`state` as checkpoints hold it: per-layer (a copy only under model.scan_layers), and for
    a PEFT run its trainable parameters only."""
    state = on_disk_state(built, state)
    return state.replace(params=built.partition.trainable(state.params))


def saved_target(built: build.Built) -> train.TrainState:
    """The abstract state a checkpoint of `built`'s run holds (`on_disk`), on its shardings."""
    target = train.on_disk(checkpoint.abstract_like(built.abstract, built.shardings))
    return target.replace(params=built.partition.trainable(target.params))


def latest(
    built: build.Built, ckpt: checkpoint.Checkpointer, data_iter: Any, seed: int
) -> tuple[int, train.TrainState] | None:
    """(step, state) of `ckpt`'s newest intact checkpoint in the run's layout (a PEFT run's
    base loaded again through its pointer), or None without one; sets `data_iter`."""
    resumed = ckpt.restore_latest(saved_target(built), data_iter, metrics.log)
    if resumed is None:
        return None
    step, state = resumed
    if built.finetune.enabled:
        fresh = on_disk_state(built, built.fresh_state(seed)).params
        base = _base(os.path.dirname(ckpt.directory), fresh)
        state = state.replace(params=built.partition.merge(state.params, base))
    return step, from_disk(built, state)


def _base(workdir: str, fresh: Any) -> Any:
    """The frozen base of the PEFT run in `workdir`, as its pointer says, over `fresh`."""
    pointer = peft.read_base(workdir)
    params = fresh
    if pointer["workdir"]:
        spec = ml_collections.ConfigDict({"workdir": pointer["workdir"], "step": pointer["step"]})
        source = hf_source(pointer["workdir"]) if pointer["hf"] else resolve(spec)
        found = peft.fingerprint(_source_folder(source))
        if found != pointer["fingerprint"]:
            raise KilnError(
                f"{workdir}: the base model of this PEFT run, {pointer['workdir']} step"
                f" {pointer['step']}, has changed since the run started (fingerprint {found},"
                f" recorded {pointer['fingerprint']}). Restore that base, or start a new workdir."
            )
        loaded, _, _ = plan(source, fresh, pointer["skip"])
        params = load_params(source, fresh, loaded)
    return peft.Partition(True).split(params)[1]


def _source_folder(source: Source) -> str:
    if source.params is not None:  # An HF directory.
        return source.workdir
    return os.path.join(source.workdir, workdir_lib.CHECKPOINTS, str(source.step))


def from_disk(built: build.Built, state: train.TrainState) -> train.TrainState:
    """A restored per-layer state in the run's layout, on its shardings."""
    if not built.model.config.scan_layers:
        return state
    return jax.jit(train.in_memory, out_shardings=built.shardings)(state)


def initial_state(
    built: build.Built,
    ckpt: checkpoint.Checkpointer,
    init_cfg: ml_collections.ConfigDict,
    seed: int,
    source: Source | None,
    data_iter: Any,
) -> train.TrainState:
    """The run's first state, in the restore order (logged): `ckpt`'s latest step (which also
    sets `data_iter` to its position) > `source` as `init_cfg` (the `init_from` section) says >
    a fresh state from `seed`."""
    resumed = latest(built, ckpt, data_iter, seed)  # Verified; falls back.
    if resumed is not None:
        metrics.log(f"Restore: resuming from this workdir's checkpoint at step {resumed[0]}")
        return resumed[1]
    fresh = built.fresh_state(seed)
    if source is None:
        metrics.log("Restore: no checkpoint in this workdir; initialising from scratch")
        if not built.finetune.enabled:
            return fresh
        return _start_peft(built, ckpt, on_disk_state(built, fresh), None, init_cfg, seed)
    if init_cfg.load == "state":
        target = train.on_disk(checkpoint.abstract_like(built.abstract, built.shardings))
        state = from_disk(built, load_state(source, target))
        metrics.log(
            f"Restore: init_from {source.workdir} step {source.step}: full state (parameters and"
            " optimizer moments); step and schedule restart at 0"
        )
        return state.replace(step=fresh.step, rng=fresh.rng)
    fresh = on_disk_state(built, fresh)  # init_from works on per-layer parameter paths.
    loaded, fresh_paths, unused = plan(source, fresh.params, init_cfg.skip)
    if not loaded:
        raise KilnError(
            f"init_from: no parameter of {source.workdir} matches this model (or init_from.skip"
            " skips them all); check init_from.workdir and init_from.skip."
        )
    params = load_params(source, fresh.params, loaded)
    metrics.log(
        f"Restore: init_from {source.workdir} step {source.step}: {len(loaded)} parameter"
        f" arrays loaded; fresh: {fresh_paths or 'none'}; not used: {unused or 'none'}"
    )
    return _start_peft(built, ckpt, fresh.replace(params=params), source, init_cfg, seed)


def on_disk_state(built: build.Built, state: train.TrainState) -> train.TrainState:
    """`state` with per-layer blocks (a copy only under model.scan_layers)."""
    return jax.jit(train.on_disk)(state) if built.model.config.scan_layers else state


def _start_peft(
    built: build.Built,
    ckpt: checkpoint.Checkpointer,
    state: train.TrainState,
    source: Source | None,
    init_cfg: ml_collections.ConfigDict,
    seed: int,
) -> train.TrainState:
    """The first state (per layer) in the run's layout; a PEFT run also gets its soft prompt's
    init and records its base (`peft.write_base`)."""
    if built.finetune.enabled:
        state = state.replace(params=peft.init_prompt(built.finetune, state.params, seed))
        base = {"workdir": "", "step": 0, "hf": False, "skip": init_cfg.skip, "fingerprint": ""}
        if source is not None:
            folder = _source_folder(source)
            base.update(workdir=source.workdir, step=source.step, hf=source.params is not None)
            base["fingerprint"] = peft.fingerprint(folder)
        peft.write_base(os.path.dirname(ckpt.directory), base)
        trained = peft.count(built.partition.trainable(state.params))
        metrics.log(
            f"PEFT: {trained:,} of {peft.count(state.params):,} parameters train (LoRA rank"
            f" {built.finetune.lora_rank}, soft prompt {built.finetune.prompt_length}); the base is"
            f" frozen: {base['workdir'] or 'scratch'}"
        )
    return from_disk(built, state)


def params_for_inference(
    source: Source, mesh: jax.sharding.Mesh, num_classes: int = 0, pooling: str = ""
) -> tuple[nn.Module, Any]:
    """(model, parameters) of `source`'s checkpoint, per layer, sharded over `mesh`; with
    `num_classes`, its classification model. A PEFT run's model has its adapters, and its
    frozen base is loaded through the run's pointer (`peft.BASE`). The model is unscanned
    (`model.scan_layers` off), as checkpoints hold per-layer blocks."""
    spec = peft.spec(source.config)
    unscanned = ml_collections.ConfigDict({**source.config.model.to_dict(), "scan_layers": False})
    model = models.build_model(unscanned, num_classes, pooling, spec.model_fields())
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"])
    shardings = sharding.tree_shardings(boxed, mesh)
    if source.params is not None:
        return model, jax.tree.map(_place, source.params, shardings)
    partition = peft.Partition(spec.enabled)
    abstract = partition.trainable(checkpoint.abstract_like(nn.unbox(boxed), shardings))
    ckpt = checkpoint.Checkpointer(os.path.join(source.workdir, workdir_lib.CHECKPOINTS))
    try:
        params = ckpt.restore_params(source.step, abstract)
    finally:
        ckpt.close()
    if spec.enabled:
        seed = source.config.seed
        fresh = jax.jit(lambda: train.init_params(model, seed), out_shardings=shardings)()
        params = partition.merge(params, _base(source.workdir, fresh))
    return model, params
