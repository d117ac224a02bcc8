"""Hugging Face checkpoints in and out of kiln.

One module per HF architecture (`model_type` in an HF config.json) maps its tensors to a kiln
`model` section and parameter tree and back. Each such module defines:

    MODEL_TYPE: str                      # HF config.json "model_type", e.g. "gpt2"
    def to_kiln(hf_config: dict, tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
        '''kiln `model` section fields (family included) and the nested parameter dict, laid
        out as `model.init` gives it with scan_layers=False.'''
    def to_hf(model: dict, params: dict) -> tuple[dict, dict[str, np.ndarray]]:
        '''The HF config.json dict and the tensors under their HF (PyTorch) names. The config
        names the HF class in "architectures" (e.g. ["GPT2LMHeadModel"]).'''

and optionally

    def model_fields(hf_config: dict) -> dict:
        '''The `model` fields of `to_kiln` from config.json alone (`checkpoints.kiln_config`
        then reads no tensor).'''
    def mismatches(model: dict) -> list[str]:
        '''Why this architecture cannot express the kiln `model` section ([] if it can); the
        export picks the first architecture of the family without any (`for_model`).'''

`files` reads and writes HF directories; `checkpoints` imports one into a kiln workdir (or an
`init_from` source) and exports a kiln run.
"""

import importlib
from types import ModuleType
from typing import Any

import numpy as np

from kiln.errors import KilnError

# HF model_type -> the module of this package that maps it.
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "bert": "bert", "t5": "t5"}
# kiln model.family -> the HF model_types an export may write, in the order tried.
FAMILY_TYPES = {"gpt": ("gpt2", "llama"), "bert": ("bert",), "t5": ("t5",)}
# HF class (config.json "architectures") -> the transformers Auto class that loads it.
AUTO_CLASSES = {
    "GPT2LMHeadModel": "AutoModelForCausalLM",
    "LlamaForCausalLM": "AutoModelForCausalLM",
    "BertForMaskedLM": "AutoModelForMaskedLM",
    "BertForSequenceClassification": "AutoModelForSequenceClassification",
    "T5ForConditionalGeneration": "AutoModelForSeq2SeqLM",
}


def architecture(model_type: str) -> ModuleType:
    """The mapping module for an HF `model_type`."""
    if model_type not in ARCHITECTURES:
        raise KilnError(
            f"HF model_type={model_type!r} is not supported: kiln imports {sorted(ARCHITECTURES)}."
        )
    return importlib.import_module(f"kiln.hf.{ARCHITECTURES[model_type]}")


def for_model(model: dict[str, Any]) -> ModuleType:
    """The mapping module an export of the kiln `model` section uses (see `mismatches`)."""
    family = model.get("family")
    if family not in FAMILY_TYPES:
        raise KilnError(
            f"model.family={family!r} has no Hugging Face export; kiln exports"
            f" {sorted(FAMILY_TYPES)}."
        )
    reasons = []
    for model_type in FAMILY_TYPES[family]:
        module = architecture(model_type)
        problems = module.mismatches(model) if hasattr(module, "mismatches") else []
        if not problems:
            return module
        reasons.append(f"{model_type} needs {'; '.join(problems)}")
    raise KilnError(
        f"No Hugging Face architecture expresses this model.family={family!r} model:"
        f" {' | '.join(reasons)}. Export a run whose model section one of them can express."
    )


def take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    """`tensors[name]` as float32, checked against the `shape` the HF config implies."""
    if name not in tensors:
        raise KilnError(
            f"HF checkpoint: tensor {name!r} is missing (it has {len(tensors)} tensors). Is"
            " the directory a complete save_pretrained output of the architecture config.json"
            " names?"
        )
    value = np.asarray(tensors[name], np.float32)
    if value.shape != tuple(shape):
        raise KilnError(
            f"HF checkpoint: tensor {name!r} has shape {value.shape}, but config.json implies"
            f" {tuple(shape)}. The weights and config.json come from different models."
        )
    return value


def base_prefix(tensors: dict[str, np.ndarray], prefix: str, probe: str) -> str:
    """`prefix` + "." if the tensors carry the task model's base-model prefix (e.g.
    "transformer.wte.weight"), "" if they were saved from the base model ("wte.weight")."""
    if f"{prefix}.{probe}" in tensors or probe not in tensors:
        return f"{prefix}."
    return ""


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}."""
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        node = out
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = leaf
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of `nest`: {"a": {"b": {"c": x}}} -> {"a/b/c": x}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Recorder(dict):
    """A kiln parameter tree that remembers the paths `param` read from it."""

    def __init__(self, tree: dict[str, Any]):
        super().__init__(tree)
        self.read: set[str] = set()


def param(params: dict[str, Any], path: str) -> np.ndarray:
    """The kiln parameter at `path` ("block_0/attn/query/kernel") as a NumPy array."""
    if isinstance(params, Recorder):
        params.read.add(path)
    node: Any = params
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise KilnError(
                f"kiln checkpoint: parameter {path!r} is missing; the export needs it. Export"
                " a checkpoint of the model section's own architecture."
            )
        node = node[key]
    return np.asarray(node)


def head_dim(model: dict[str, Any]) -> int:
    """The attention head size of a kiln `model` section (`head_dim`, 0 = d_model // n_heads)."""
    return int(model.get("head_dim") or 0) or model["d_model"] // model["n_heads"]


def mismatches(model: dict[str, Any], want: dict[str, Any], plain_heads: bool = True) -> list[str]:
    """The `model` fields an architecture's export needs changed: each of `want` (field ->
    value) that differs and, with `plain_heads`, grouped-query attention or a head size other
    than d_model // n_heads. [] when `model` is that architecture."""
    problems = [f"model.{k}={v!r}" for k, v in want.items() if model.get(k, v) != v]
    if plain_heads and model.get("n_kv_heads", model["n_heads"]) != model["n_heads"]:
        problems.append("model.n_kv_heads=model.n_heads (no grouped-query attention)")
    if plain_heads and head_dim(model) * model["n_heads"] != model["d_model"]:
        problems.append("model.head_dim=0 (d_model // n_heads)")
    return problems
