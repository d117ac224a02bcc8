"""GPT-2 (`GPT2LMHeadModel`) <-> kiln's gpt family in its GPT-2 style.

Learned positions, pre-LN LayerNorm, GELU MLP, biases everywhere, tied embeddings (an untied
`lm_head` is mapped too). GPT-2's Conv1D weights are [in, out], kiln's kernels too, so only the
fused `c_attn` [D, 3D] is split into query, key and value and the heads made explicit.
"""

from typing import Any

import numpy as np

from kiln import hf
from kiln.errors import KilnError
from kiln.hf import base_prefix, nest, param, take

MODEL_TYPE = "gpt2"
HF_CLASS = "GPT2LMHeadModel"
# activation_function -> kiln (mlp, gelu_approximate). gelu_new and gelu_pytorch_tanh are the
# tanh approximation kiln's GELU computes by default.
_ACTIVATIONS = {
    "gelu_new": ("gelu", True),
    "gelu_pytorch_tanh": ("gelu", True),
    "gelu": ("gelu", False),
    "relu": ("relu", True),
}


def _check_config(hf_config: dict[str, Any]) -> None:
    """Refuses the GPT-2 options kiln's gpt family does not compute."""
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in _ACTIVATIONS:
        raise KilnError(
            f"HF gpt2 config: activation_function={activation!r} is not supported; kiln maps"
            f" {sorted(_ACTIVATIONS)}."
        )
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf_config.get(key):
            raise KilnError(
                f"HF gpt2 config: {key}=True has no kiln equivalent; only checkpoints with"
                f" {key}=False can be imported."
            )


def model_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The kiln `model` fields (family included) of a GPT-2 config.json."""
    _check_config(hf_config)
    d = hf_config["n_embd"]
    mlp, approximate = _ACTIVATIONS[hf_config.get("activation_function", "gelu_new")]
    return {
        "family": "gpt",
        "vocab_size": hf_config["vocab_size"],
        "d_model": d,
        "n_layers": hf_config["n_layer"],
        "n_heads": hf_config["n_head"],
        "n_kv_heads": hf_config["n_head"],
        "d_ff": hf_config.get("n_inner") or 4 * d,
        "max_len": hf_config.get("n_positions", 1024),
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "pre",
        "mlp": mlp,
        "gelu_approximate": approximate,
        "use_bias": True,
        "tie_embeddings": hf_config.get("tie_word_embeddings", True),
        "norm_eps": hf_config.get("layer_norm_epsilon", 1e-5),
        "scale_attention": hf_config.get("scale_attn_weights", True),
        "dropout": hf_config.get("resid_pdrop", 0.1),
        "init_std": hf_config.get("initializer_range", 0.02),
    }


def to_kiln(hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """kiln `model` fields and parameters of a GPT2LMHeadModel (or GPT2Model) checkpoint."""
    model = model_fields(hf_config)
    d, n_layers, h = model["d_model"], model["n_layers"], model["n_heads"]
    vocab, max_len, d_ff, e = model["vocab_size"], model["max_len"], model["d_ff"], d // h
    t = base_prefix(tensors, "transformer", "wte.weight")
    p = {
        "token_embed/embedding": take(tensors, f"{t}wte.weight", (vocab, d)),
        "position_embed/embedding": take(tensors, f"{t}wpe.weight", (max_len, d)),
        "final_norm/scale": take(tensors, f"{t}ln_f.weight", (d,)),
        "final_norm/bias": take(tensors, f"{t}ln_f.bias", (d,)),
    }
    for i in range(n_layers):
        hf, k = f"{t}h.{i}.", f"block_{i}/"
        for kiln_norm, hf_norm in (("pre_attn_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
            p[f"{k}{kiln_norm}/scale"] = take(tensors, f"{hf}{hf_norm}.weight", (d,))
            p[f"{k}{kiln_norm}/bias"] = take(tensors, f"{hf}{hf_norm}.bias", (d,))
        qkv = np.split(take(tensors, f"{hf}attn.c_attn.weight", (d, 3 * d)), 3, axis=1)
        qkv_bias = np.split(take(tensors, f"{hf}attn.c_attn.bias", (3 * d,)), 3)
        for name, kernel, bias in zip(("query", "key", "value"), qkv, qkv_bias):
            p[f"{k}attn/{name}/kernel"] = kernel.reshape(d, h, e)
            p[f"{k}attn/{name}/bias"] = bias.reshape(h, e)
        p[f"{k}attn/out/kernel"] = take(tensors, f"{hf}attn.c_proj.weight", (d, d)).reshape(h, e, d)
        p[f"{k}attn/out/bias"] = take(tensors, f"{hf}attn.c_proj.bias", (d,))
        p[f"{k}mlp/wi/kernel"] = take(tensors, f"{hf}mlp.c_fc.weight", (d, d_ff))
        p[f"{k}mlp/wi/bias"] = take(tensors, f"{hf}mlp.c_fc.bias", (d_ff,))
        p[f"{k}mlp/wo/kernel"] = take(tensors, f"{hf}mlp.c_proj.weight", (d_ff, d))
        p[f"{k}mlp/wo/bias"] = take(tensors, f"{hf}mlp.c_proj.bias", (d,))
    if not model["tie_embeddings"]:
        p["lm_head/kernel"] = take(tensors, "lm_head.weight", (vocab, d)).T
    return model, nest(p)


def mismatches(model: dict[str, Any]) -> list[str]:
    """What a kiln gpt `model` section would need to be a GPT-2 ([] if it is one)."""
    want = {
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "pre",
        "use_bias": True,
        "type_vocab_size": 0,
    }
    problems = hf.mismatches(model, want)
    if model.get("mlp") not in ("gelu", "relu"):
        problems.append("model.mlp='gelu' or 'relu'")
    return problems


def to_hf(model: dict[str, Any], params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The GPT2LMHeadModel config.json and tensors of a kiln GPT-2 style model."""
    problems = mismatches(model)
    if problems:
        raise KilnError(f"This kiln model is not a GPT-2: export needs {'; '.join(problems)}.")
    d, n_layers = model["d_model"], model["n_layers"]
    activation = "relu" if model["mlp"] == "relu" else "gelu"
    if activation == "gelu" and model.get("gelu_approximate", True):
        activation = "gelu_new"
    config = {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        "vocab_size": model["vocab_size"],
        "n_positions": model["max_len"],
        "n_embd": d,
        "n_layer": n_layers,
        "n_head": model["n_heads"],
        "n_inner": model["d_ff"],
        "activation_function": activation,
        "layer_norm_epsilon": model["norm_eps"],
        "scale_attn_weights": model.get("scale_attention", True),
        "tie_word_embeddings": model["tie_embeddings"],
        "resid_pdrop": model.get("dropout", 0.0),
        "embd_pdrop": model.get("dropout", 0.0),
        "attn_pdrop": model.get("dropout", 0.0),
        "initializer_range": model.get("init_std", 0.02),
        "torch_dtype": "float32",
    }
    t = {
        "transformer.wte.weight": param(params, "token_embed/embedding"),
        "transformer.wpe.weight": param(params, "position_embed/embedding"),
        "transformer.ln_f.weight": param(params, "final_norm/scale"),
        "transformer.ln_f.bias": param(params, "final_norm/bias"),
    }
    for i in range(n_layers):
        hf, k = f"transformer.h.{i}.", f"block_{i}/"
        for kiln_norm, hf_norm in (("pre_attn_norm", "ln_1"), ("pre_mlp_norm", "ln_2")):
            t[f"{hf}{hf_norm}.weight"] = param(params, f"{k}{kiln_norm}/scale")
            t[f"{hf}{hf_norm}.bias"] = param(params, f"{k}{kiln_norm}/bias")
        names = ("query", "key", "value")
        kernels = [param(params, f"{k}attn/{n}/kernel").reshape(d, d) for n in names]
        biases = [param(params, f"{k}attn/{n}/bias").reshape(d) for n in names]
        t[f"{hf}attn.c_attn.weight"] = np.concatenate(kernels, axis=1)
        t[f"{hf}attn.c_attn.bias"] = np.concatenate(biases)
        t[f"{hf}attn.c_proj.weight"] = param(params, f"{k}attn/out/kernel").reshape(d, d)
        t[f"{hf}attn.c_proj.bias"] = param(params, f"{k}attn/out/bias")
        t[f"{hf}mlp.c_fc.weight"] = param(params, f"{k}mlp/wi/kernel")
        t[f"{hf}mlp.c_fc.bias"] = param(params, f"{k}mlp/wi/bias")
        t[f"{hf}mlp.c_proj.weight"] = param(params, f"{k}mlp/wo/kernel")
        t[f"{hf}mlp.c_proj.bias"] = param(params, f"{k}mlp/wo/bias")
    if not model["tie_embeddings"]:
        t["lm_head.weight"] = param(params, "lm_head/kernel").T
    return config, {name: np.ascontiguousarray(x) for name, x in t.items()}
