"""A Hugging Face directory as a kiln run, and a kiln model as a Hugging Face directory.

Import (`load`, `write_workdir`): config.json names the `model_type`, whose module in this
package maps the tensors to a kiln `model` section and per-layer parameter tree; the tree is
checked against the one `model.init` builds. `write_workdir` lays it out as a finished kiln
run, which `init_from.workdir` reads like any other:

    <out>/config.json        a full kiln config: kiln's defaults, the imported model section
    <out>/tokenizer/         the HF tokenizer (`kiln.data.tokenizer.save_tokenizer`)
    <out>/checkpoints/0/     orbax: `state.params` only (init_from.load=params)
    <out>/hf_import.json     where it came from (the HF directory and its config.json) and the
                             shapes of the parameters the checkpoint holds

Export (`export`): the kiln model section picks the HF architecture (`kiln.hf.for_model`); its
module maps the parameters back; token ids come from the import's config.json, or else from
the kiln tokenizer.
"""

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kiln import checkpoint, config_lib, defaults, metrics, models
from kiln import hf as hf_lib
from kiln import workdir as workdir_lib
from kiln.data import tokenizer as tokenizer_lib
from kiln.data.objectives import Layout
from kiln.errors import KilnError
from kiln.hf import files

IMPORT_RECORD = "hf_import.json"
# Tensors an HF checkpoint may hold that are not parameters (causal-mask and rope buffers).
_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


@dataclasses.dataclass(frozen=True)
class Imported:
    """An HF checkpoint mapped to kiln: the full `model` section and float32 parameters."""

    hf_dir: str
    hf_config: dict[str, Any]
    model: ml_collections.ConfigDict
    params: dict[str, Any]  # Nested NumPy arrays, per layer (block_0, block_1, ...).
    unused: tuple[str, ...] = ()  # HF tensors no kiln parameter takes (buffers excluded).


class _Recorder(dict):
    """The checkpoint's tensors, remembering which ones the mapping read."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        super().__init__(tensors)
        self.taken: set[str] = set()

    def __getitem__(self, name: str) -> np.ndarray:
        self.taken.add(name)
        return super().__getitem__(name)


def model_section(fields: dict[str, Any]) -> ml_collections.ConfigDict:
    """kiln's default `model` section of the family, with the mapped `fields`; checked."""
    fields = dict(fields)
    family = fields.pop("family")
    unknown = sorted(set(fields) - set(defaults.model_section(family)))
    if unknown:
        raise KilnError(
            f"kiln.hf: the mapping sets model fields {unknown}, which kiln's model section does"
            " not have; this kiln is older than its kiln.hf module."
        )
    section = defaults.model_section(family, **fields)
    models.check_model_section(section)
    return section


def kiln_config(
    hf_dir_or_model: str | os.PathLike | ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
    """A full kiln run config (kiln's defaults) whose `model` section is the checkpoint's: an
    HF directory's (read from config.json alone where the architecture allows) or a `model`
    section. Fine-tune configs build on it (`arms.finetune_stage`)."""
    if isinstance(hf_dir_or_model, ml_collections.ConfigDict):
        section = hf_dir_or_model
    else:
        hf_dir = os.fspath(hf_dir_or_model)
        hf_config = files.read_config(hf_dir)
        arch = hf_lib.architecture(hf_config["model_type"])
        if hasattr(arch, "model_fields"):
            fields = arch.model_fields(hf_config)
        else:
            fields = arch.to_kiln(hf_config, files.read_tensors(hf_dir))[0]
        section = model_section(fields)
    objective = models.family(section.family).objectives[0]
    seq_len = min(section.max_len, 512)
    c = defaults.run_sections(seq_len=seq_len, batch=8, steps=1, lr=1e-4, objective=objective)
    c.model = section
    return c


def load(hf_dir: str) -> Imported:
    """Reads and maps an HF save_pretrained directory (see the module docstring)."""
    hf_dir = os.path.abspath(os.path.expanduser(hf_dir))
    hf_config = files.read_config(hf_dir)
    arch = hf_lib.architecture(hf_config["model_type"])
    tensors = _Recorder(files.read_tensors(hf_dir))
    fields, params = arch.to_kiln(hf_config, tensors)
    section = model_section(fields)
    _check_params(section, params, hf_dir)
    unused = sorted(n for n in set(tensors) - tensors.taken if not n.endswith(_BUFFERS))
    return Imported(hf_dir, hf_config, section, params, tuple(unused))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(k.key) for k in path): tuple(x.shape) for path, x in leaves}


def _model_shapes(section: ml_collections.ConfigDict, num_classes: int = 0) -> dict:
    model = models.build_model(section, num_classes)
    example = models.example_inputs(model, 8)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **example)["params"])
    return _shapes(nn.unbox(boxed))


def _absent_head(path: str, present: set[str]) -> bool:
    """Whether `path` lies in an output head (a top-level `*_head`) the checkpoint lacks."""
    top = path.split("/")[0]
    return top.endswith("_head") and top not in present


def _check_params(section: ml_collections.ConfigDict, params: dict, hf_dir: str) -> None:
    """Raises unless `params` has the paths and shapes of the model's own tree. A head the
    checkpoint lacks (BERT's MLM head of a BertModel) may be missing as a whole; the family's
    classification head (BERT's pooler and classifier) may be there."""
    want, have = _model_shapes(section), _shapes(params)
    heads = set()
    if models.family(section.family).classifier is not None:
        heads = set(_model_shapes(section, num_classes=2)) - set(want)
    present = {p.split("/")[0] for p in have}
    missing = sorted(p for p in set(want) - set(have) if not _absent_head(p, present))
    extra = sorted(set(have) - set(want) - heads)
    wrong = [
        f"{p} {have[p]} != {want[p]}" for p in sorted(set(want) & set(have)) if have[p] != want[p]
    ]
    if missing or extra or wrong:
        raise KilnError(
            f"Importing {hf_dir}: the mapped parameters do not fit kiln's model (missing:"
            f" {missing or 'none'}; unexpected: {extra or 'none'}; shapes: {wrong or 'none'})."
            " This is a bug in kiln.hf; please report it with the checkpoint's config.json."
        )


def write_workdir(imported: Imported, out: str) -> None:
    """Writes `imported` as a finished kiln run in `out` (see the module docstring)."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and os.listdir(out):
        raise KilnError(f"--out {out} exists and is not empty; choose a new directory.")
    os.makedirs(out, exist_ok=True)
    _write_tokenizer(imported, os.path.join(out, workdir_lib.TOKENIZER_DIR))
    ckpt = checkpoint.Checkpointer(os.path.join(out, workdir_lib.CHECKPOINTS), async_save=False)
    try:
        ckpt.save(0, {"params": jax.tree.map(jnp.asarray, imported.params)})
    finally:
        ckpt.close()
    shapes = {path: list(shape) for path, shape in _shapes(imported.params).items()}
    record = {"hf_dir": imported.hf_dir, "hf_config": imported.hf_config, "params": shapes}
    config_lib.write_atomically(os.path.join(out, IMPORT_RECORD), json.dumps(record, indent=2))
    # Last: config.json makes the directory a run (an interrupted import is not one).
    config_lib.save_json(kiln_config(imported.model), os.path.join(out, workdir_lib.CONFIG))


def _write_tokenizer(imported: Imported, dest: str) -> None:
    """The checkpoint's tokenizer (checked to load, and to fit the vocabulary) into `dest`."""
    names = workdir_lib.HF_TOKENIZER_FILES
    if not any(os.path.isfile(os.path.join(imported.hf_dir, name)) for name in names):
        metrics.log(
            f"Import: {imported.hf_dir} has no tokenizer ({' or '.join(names)}); a fine-tune"
            f" of the import needs one copied into {dest}"
            " (AutoTokenizer.from_pretrained(...).save_pretrained(dest) writes it)"
        )
        return
    tok = tokenizer_lib.load_tokenizer(imported.hf_dir)
    if tok.vocab_size > imported.model.vocab_size:
        raise KilnError(
            f"Importing {imported.hf_dir}: its tokenizer has {tok.vocab_size} tokens but the"
            f" model only {imported.model.vocab_size} embeddings; they are not one checkpoint."
        )
    tokenizer_lib.save_tokenizer(tok, dest)


def import_record(workdir: str) -> dict[str, Any] | None:
    """The hf_import.json of an imported workdir (None for a run kiln trained)."""
    path = os.path.join(workdir, IMPORT_RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def param_shapes(workdir: str) -> dict[str, tuple[int, ...]] | None:
    """The shapes of the parameters an imported workdir's checkpoint holds (None for a run
    kiln trained, whose parameters are its model section's)."""
    record = import_record(workdir)
    if record is None or "params" not in record:
        return None
    return {path: tuple(shape) for path, shape in record["params"].items()}


def export(
    model: dict[str, Any], params: dict[str, Any], token_ids: dict[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The HF config.json and tensors of a kiln `model` section and its per-layer parameters;
    `token_ids` (e.g. {"eos_token_id": 3}) go into the config."""
    arch = hf_lib.for_model(model)
    recorded = hf_lib.Recorder(jax.tree.map(np.asarray, params))
    hf_config, tensors = arch.to_hf(model, recorded)
    left = sorted(set(hf_lib.flatten(recorded)) - recorded.read)
    if left:
        hf_class = hf_config.get("architectures", [hf_config.get("model_type")])[0]
        metrics.log(f"Export: kiln parameters with no place in {hf_class}: {left}")
    hf_config.update(token_ids or {})
    dtypes = {str(x.dtype) for x in tensors.values()}
    if len(dtypes) == 1:
        hf_config["torch_dtype"] = dtypes.pop()
    return hf_config, tensors


def token_ids(workdir: str, tokenizer: Any | None, family: str) -> dict[str, int]:
    """The special token ids an export's config.json gets: an imported checkpoint's own, else
    those of the run's `tokenizer` (an encoder-decoder starts decoding from its bos, which
    for an HF T5 tokenizer is pad, as in T5)."""
    record = import_record(workdir)
    if record is not None:
        return {k: v for k, v in record["hf_config"].items() if k.endswith("_token_id")}
    if tokenizer is None:
        return {}
    roles = {"pad_token_id": "pad_id", "bos_token_id": "bos_id", "eos_token_id": "eos_id"}
    if models.family(family).layout == Layout.ENCODER_DECODER:
        roles["decoder_start_token_id"] = "bos_id"
    ids = {key: getattr(tokenizer, role) for key, role in roles.items()}
    return {key: int(value) for key, value in ids.items() if value is not None}
