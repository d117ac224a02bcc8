"""Llama (`LlamaForCausalLM`) <-> kiln's gpt family in its modern style.

RoPE (half-split rotation, HF's `rotate_half`, the same convention as `layers.apply_rope`),
RMSNorm, SwiGLU (`gate_proj` = kiln `wi_0`, `up_proj` = `wi_1`), no biases, grouped-query
attention (`num_key_value_heads` = `n_kv_heads`). PyTorch Linear weights are [out, in]; kiln's
kernels are [in, out] with the heads explicit.
"""

from typing import Any

import numpy as np

from kiln import hf
from kiln.errors import KilnError
from kiln.hf import base_prefix, head_dim, nest, param, take

MODEL_TYPE = "llama"
HF_CLASS = "LlamaForCausalLM"


def _check_config(hf_config: dict[str, Any]) -> None:
    """Refuses the Llama options kiln's modern gpt does not compute."""
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise KilnError(f"HF llama config: hidden_act={act!r}; kiln's SwiGLU needs 'silu'.")
    scaling = hf_config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "default":
        raise KilnError(
            f"HF llama config: rope_scaling={scaling!r} is not supported; kiln's RoPE has no"
            " frequency scaling (only checkpoints with rope_scaling null import)."
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise KilnError(
                f"HF llama config: {key}=True is not supported; kiln's modern style has no"
                " biases (only checkpoints with attention_bias and mlp_bias false import)."
            )


def model_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The kiln `model` fields (family included) of a Llama config.json."""
    _check_config(hf_config)
    d, h = hf_config["hidden_size"], hf_config["num_attention_heads"]
    e = hf_config.get("head_dim") or d // h
    return {
        "family": "gpt",
        "vocab_size": hf_config["vocab_size"],
        "d_model": d,
        "n_layers": hf_config["num_hidden_layers"],
        "n_heads": h,
        "n_kv_heads": hf_config.get("num_key_value_heads") or h,
        "head_dim": 0 if e * h == d else e,
        "d_ff": hf_config["intermediate_size"],
        "max_len": hf_config.get("max_position_embeddings", 2048),
        "position": "rope",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "mlp": "swiglu",
        "use_bias": False,
        "tie_embeddings": hf_config.get("tie_word_embeddings", False),
        "norm_eps": hf_config.get("rms_norm_eps", 1e-6),
        "rope_theta": float(hf_config.get("rope_theta", 10000.0)),
        "dropout": hf_config.get("attention_dropout", 0.0),
        "init_std": hf_config.get("initializer_range", 0.02),
    }


def to_kiln(hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """kiln `model` fields and parameters of a LlamaForCausalLM (or LlamaModel) checkpoint."""
    model = model_fields(hf_config)
    d, n_layers, h, kv = (model[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads"))
    e, vocab, d_ff = head_dim(model), model["vocab_size"], model["d_ff"]
    m = base_prefix(tensors, "model", "embed_tokens.weight")
    p = {
        "token_embed/embedding": take(tensors, f"{m}embed_tokens.weight", (vocab, d)),
        "final_norm/scale": take(tensors, f"{m}norm.weight", (d,)),
    }
    for i in range(n_layers):
        hf, k = f"{m}layers.{i}.", f"block_{i}/"
        p[f"{k}pre_attn_norm/scale"] = take(tensors, f"{hf}input_layernorm.weight", (d,))
        p[f"{k}pre_mlp_norm/scale"] = take(tensors, f"{hf}post_attention_layernorm.weight", (d,))
        for name, proj, heads in (("query", "q", h), ("key", "k", kv), ("value", "v", kv)):
            weight = take(tensors, f"{hf}self_attn.{proj}_proj.weight", (heads * e, d))
            p[f"{k}attn/{name}/kernel"] = weight.T.reshape(d, heads, e)
        out = take(tensors, f"{hf}self_attn.o_proj.weight", (d, h * e))
        p[f"{k}attn/out/kernel"] = out.T.reshape(h, e, d)
        p[f"{k}mlp/wi_0/kernel"] = take(tensors, f"{hf}mlp.gate_proj.weight", (d_ff, d)).T
        p[f"{k}mlp/wi_1/kernel"] = take(tensors, f"{hf}mlp.up_proj.weight", (d_ff, d)).T
        p[f"{k}mlp/wo/kernel"] = take(tensors, f"{hf}mlp.down_proj.weight", (d, d_ff)).T
    if not model["tie_embeddings"]:
        p["lm_head/kernel"] = take(tensors, "lm_head.weight", (vocab, d)).T
    return model, nest(p)


def mismatches(model: dict[str, Any]) -> list[str]:
    """What a kiln gpt `model` section would need to be a Llama ([] if it is one)."""
    want = {
        "position": "rope",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "mlp": "swiglu",
        "use_bias": False,
        "scale_attention": True,
        "type_vocab_size": 0,
    }
    return hf.mismatches(model, want, plain_heads=False)


def to_hf(model: dict[str, Any], params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The LlamaForCausalLM config.json and tensors of a kiln modern-style gpt model."""
    problems = mismatches(model)
    if problems:
        raise KilnError(f"This kiln model is not a Llama: export needs {'; '.join(problems)}.")
    d, n_layers, h = model["d_model"], model["n_layers"], model["n_heads"]
    e = head_dim(model)
    config = {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        "vocab_size": model["vocab_size"],
        "hidden_size": d,
        "intermediate_size": model["d_ff"],
        "num_hidden_layers": n_layers,
        "num_attention_heads": h,
        "num_key_value_heads": model["n_kv_heads"],
        "head_dim": e,
        "hidden_act": "silu",
        "max_position_embeddings": model["max_len"],
        "rms_norm_eps": model["norm_eps"],
        "rope_theta": model["rope_theta"],
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": model.get("dropout", 0.0),
        "initializer_range": model.get("init_std", 0.02),
        "tie_word_embeddings": model["tie_embeddings"],
        "torch_dtype": "float32",
    }
    t = {
        "model.embed_tokens.weight": param(params, "token_embed/embedding"),
        "model.norm.weight": param(params, "final_norm/scale"),
    }
    for i in range(n_layers):
        hf, k = f"model.layers.{i}.", f"block_{i}/"
        t[f"{hf}input_layernorm.weight"] = param(params, f"{k}pre_attn_norm/scale")
        t[f"{hf}post_attention_layernorm.weight"] = param(params, f"{k}pre_mlp_norm/scale")
        for name, proj in (("query", "q"), ("key", "k"), ("value", "v")):
            kernel = param(params, f"{k}attn/{name}/kernel")
            t[f"{hf}self_attn.{proj}_proj.weight"] = kernel.reshape(d, -1).T
        t[f"{hf}self_attn.o_proj.weight"] = param(params, f"{k}attn/out/kernel").reshape(-1, d).T
        t[f"{hf}mlp.gate_proj.weight"] = param(params, f"{k}mlp/wi_0/kernel").T
        t[f"{hf}mlp.up_proj.weight"] = param(params, f"{k}mlp/wi_1/kernel").T
        t[f"{hf}mlp.down_proj.weight"] = param(params, f"{k}mlp/wo/kernel").T
    if not model["tie_embeddings"]:
        t["lm_head.weight"] = param(params, "lm_head/kernel").T
    return config, {name: np.ascontiguousarray(x) for name, x in t.items()}
