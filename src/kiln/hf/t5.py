"""T5 (`T5ForConditionalGeneration`, v1.0 and v1.1) <-> kiln's t5 family.

Both are kiln's t5: RMSNorm without bias, no biases, unscaled attention logits, one relative
position bias table per stack (HF keeps it in block 0 of each stack; kiln beside the blocks,
shared by all of them, the same function). v1.0: ReLU MLP, output tied to the shared embedding
with decoder outputs scaled by d_model^-0.5 (`tie_embeddings=True`); v1.1: gated GELU
(`mlp="geglu"`, tanh) and an untied `lm_head`. HF's `d_kv` is kiln's `head_dim` (0 when it is
d_model / num_heads). Linear weights are [out, in]; kiln's kernels [in, out], heads explicit.
"""

from typing import Any

import numpy as np

from kiln import models
from kiln.errors import KilnError
from kiln.hf import nest, param, take

MODEL_TYPE = "t5"
HF_CLASS = "T5ForConditionalGeneration"
# feed_forward_proj -> kiln (mlp, gelu_approximate). HF runs "gated-gelu" with the tanh GELU
# ("gelu_new"); "gelu" and "gelu_python" are the exact erf GELU.
_MLPS = {
    "relu": ("relu", True),
    "gelu": ("gelu", False),
    "gelu_python": ("gelu", False),
    "gelu_new": ("gelu", True),
    "gelu_pytorch_tanh": ("gelu", True),
    "gated-gelu": ("geglu", True),
    "gated-gelu_new": ("geglu", True),
    "gated-gelu_pytorch_tanh": ("geglu", True),
    "gated-gelu_python": ("geglu", False),
    "gated-silu": ("swiglu", True),
    "gated-swish": ("swiglu", True),
}
# kiln (mlp, gelu_approximate) -> the feed_forward_proj an export writes.
_EXPORT_MLPS = {
    ("relu", True): "relu",
    ("gelu", False): "gelu",
    ("gelu", True): "gelu_new",
    ("geglu", True): "gated-gelu",
    ("geglu", False): "gated-gelu_python",
    ("swiglu", True): "gated-silu",
}
# The sublayers of HF's blocks: (kiln attention, HF layer index and attention) per stack.
_ATTENTIONS = {
    "encoder": (("attn", "pre_attn_norm", "0.SelfAttention"),),
    "decoder": (
        ("self_attn", "pre_self_attn_norm", "0.SelfAttention"),
        ("cross_attn", "pre_cross_attn_norm", "1.EncDecAttention"),
    ),
}
_MLP_LAYER = {"encoder": "1", "decoder": "2"}  # HF layer index of the feed-forward sublayer.
_RELPOS = "block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def model_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The kiln `model` fields (family included) of a T5 config.json."""
    proj = hf_config.get("feed_forward_proj", "relu")
    if proj not in _MLPS:
        raise KilnError(
            f"HF t5 config: feed_forward_proj={proj!r} is not supported; kiln maps {sorted(_MLPS)}."
        )
    mlp, approximate = _MLPS[proj]
    d, heads, d_kv = hf_config["d_model"], hf_config["num_heads"], hf_config.get("d_kv", 64)
    n_layers = hf_config["num_layers"]
    n_decoder = hf_config.get("num_decoder_layers") or n_layers
    return {
        "family": "t5",
        "vocab_size": hf_config["vocab_size"],
        "d_model": d,
        "n_layers": n_layers,
        "n_decoder_layers": 0 if n_decoder == n_layers else n_decoder,
        "n_heads": heads,
        "n_kv_heads": heads,
        "head_dim": 0 if d_kv * heads == d else d_kv,
        "d_ff": hf_config["d_ff"],
        # T5 has no position table; this bounds kiln's prompts (T5 was trained at 512).
        "max_len": hf_config.get("n_positions", 512),
        "position": "none",
        "norm": "rmsnorm",
        "norm_position": "pre",
        "mlp": mlp,
        "gelu_approximate": approximate,
        "use_bias": False,
        "tie_embeddings": hf_config.get("tie_word_embeddings", True),
        "norm_eps": hf_config.get("layer_norm_epsilon", 1e-6),
        "dropout": hf_config.get("dropout_rate", 0.1),
        "relative_buckets": hf_config.get("relative_attention_num_buckets", 32),
        "relative_max_distance": hf_config.get("relative_attention_max_distance", 128),
        "scale_attention": False,
    }


def _mlp_names(mlp: str) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if mlp in ("geglu", "swiglu") else ("wi", "wo")


def _block_to_kiln(tensors: dict, stack: str, i: int, cfg: Any, p: dict) -> None:
    """Fills p with block i of `stack` ("encoder" or "decoder")."""
    d, h, e, f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
    hf, k = f"{stack}.block.{i}.layer.", f"{stack}/block_{i}/"
    for attn, norm, layer in _ATTENTIONS[stack]:
        p[f"{k}{norm}/scale"] = take(tensors, f"{hf}{layer.split('.')[0]}.layer_norm.weight", (d,))
        for kiln_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
            w = take(tensors, f"{hf}{layer}.{hf_name}.weight", (h * e, d))
            p[f"{k}{attn}/{kiln_name}/kernel"] = w.T.reshape(d, h, e)
        w = take(tensors, f"{hf}{layer}.o.weight", (d, h * e))
        p[f"{k}{attn}/out/kernel"] = w.T.reshape(h, e, d)
    ff = f"{hf}{_MLP_LAYER[stack]}."
    p[f"{k}pre_mlp_norm/scale"] = take(tensors, f"{ff}layer_norm.weight", (d,))
    for name in _mlp_names(cfg.mlp):
        shape = (d, f) if name == "wo" else (f, d)
        p[f"{k}mlp/{name}/kernel"] = take(tensors, f"{ff}DenseReluDense.{name}.weight", shape).T


def _embedding(tensors: dict[str, np.ndarray], cfg: Any) -> np.ndarray:
    """The shared token embedding (saved as shared.weight; a copy may be all there is)."""
    for name in ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in tensors:
            return take(tensors, name, (cfg.vocab_size, cfg.d_model))
    return take(tensors, "shared.weight", (cfg.vocab_size, cfg.d_model))  # Names it missing.


def to_kiln(hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """kiln `model` fields and parameters of a T5ForConditionalGeneration checkpoint."""
    m = model_fields(hf_config)
    cfg = models.transformer_config(m)
    p = {"token_embed/embedding": _embedding(tensors, cfg)}
    depths = {"encoder": cfg.n_layers, "decoder": cfg.n_decoder_layers or cfg.n_layers}
    for stack, depth in depths.items():
        shape = (cfg.relative_buckets, cfg.n_heads)
        p[f"{stack}/relpos_bias/embedding"] = take(tensors, f"{stack}.{_RELPOS}", shape)
        p[f"{stack}/final_norm/scale"] = take(
            tensors, f"{stack}.final_layer_norm.weight", (cfg.d_model,)
        )
        for i in range(depth):
            _block_to_kiln(tensors, stack, i, cfg, p)
    if not cfg.tie_embeddings:
        p["lm_head/kernel"] = take(tensors, "lm_head.weight", (cfg.vocab_size, cfg.d_model)).T
    elif "lm_head.weight" in tensors:
        head = np.asarray(tensors["lm_head.weight"], np.float32)
        if not np.array_equal(head, p["token_embed/embedding"]):
            raise KilnError(
                "HF checkpoint: tensor 'lm_head.weight' differs from 'shared.weight' although"
                " config.json says tie_word_embeddings=true; set it to false to import both."
            )
    return m, nest(p)


def mismatches(model: dict[str, Any]) -> list[str]:
    """What a kiln t5 `model` section would need to be an HF T5 ([] if it is one)."""
    cfg = models.transformer_config(model)
    want = {"position": "none", "norm": "rmsnorm", "use_bias": False, "scale_attention": False}
    problems = [f"model.{k}={v!r}" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.n_kv_heads != cfg.n_heads:
        problems.append("model.n_kv_heads=model.n_heads (no grouped-query attention)")
    if (cfg.mlp, cfg.gelu_approximate) not in _EXPORT_MLPS:
        problems.append(f"model.mlp in {sorted({mlp for mlp, _ in _EXPORT_MLPS})}")
    return problems


def _config(cfg: Any) -> dict[str, Any]:
    """The T5ForConditionalGeneration config.json of the kiln layer config `cfg`. Token ids
    are HF T5's (pad 0 = decoder start, eos 1); an export with another tokenizer sets its own."""
    return {
        "architectures": [HF_CLASS],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": int(cfg.head_dim),
        "d_ff": cfg.d_ff,
        "num_layers": cfg.n_layers,
        "num_decoder_layers": cfg.n_decoder_layers or cfg.n_layers,
        "num_heads": cfg.n_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "feed_forward_proj": _EXPORT_MLPS[cfg.mlp, cfg.gelu_approximate],
        "layer_norm_epsilon": cfg.norm_eps,
        "dropout_rate": cfg.dropout,
        "tie_word_embeddings": cfg.tie_embeddings,
        "is_encoder_decoder": True,
        "n_positions": cfg.max_len,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "torch_dtype": "float32",
    }


def _block_to_hf(params: dict, stack: str, i: int, cfg: Any, t: dict) -> None:
    """Fills t with kiln block i of `stack` ("encoder" or "decoder")."""
    d, inner = cfg.d_model, cfg.n_heads * cfg.head_dim
    hf, k = f"{stack}.block.{i}.layer.", f"{stack}/block_{i}/"
    for attn, norm, layer in _ATTENTIONS[stack]:
        t[f"{hf}{layer.split('.')[0]}.layer_norm.weight"] = param(params, f"{k}{norm}/scale")
        for kiln_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
            kernel = param(params, f"{k}{attn}/{kiln_name}/kernel").reshape(d, inner)
            t[f"{hf}{layer}.{hf_name}.weight"] = kernel.T
        t[f"{hf}{layer}.o.weight"] = param(params, f"{k}{attn}/out/kernel").reshape(inner, d).T
    ff = f"{hf}{_MLP_LAYER[stack]}."
    t[f"{ff}layer_norm.weight"] = param(params, f"{k}pre_mlp_norm/scale")
    for name in _mlp_names(cfg.mlp):
        t[f"{ff}DenseReluDense.{name}.weight"] = param(params, f"{k}mlp/{name}/kernel").T


def to_hf(model: dict[str, Any], params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The T5ForConditionalGeneration config.json and tensors of a kiln t5 model."""
    problems = mismatches(model)
    if problems:
        raise KilnError(f"This kiln model is not an HF T5: export needs {'; '.join(problems)}.")
    cfg = models.transformer_config(model)
    # save_pretrained keeps the shared embedding once, under the name the encoder reads.
    t = {"shared.weight": param(params, "token_embed/embedding")}
    depths = {"encoder": cfg.n_layers, "decoder": cfg.n_decoder_layers or cfg.n_layers}
    for stack, depth in depths.items():
        t[f"{stack}.{_RELPOS}"] = param(params, f"{stack}/relpos_bias/embedding")
        t[f"{stack}.final_layer_norm.weight"] = param(params, f"{stack}/final_norm/scale")
        for i in range(depth):
            _block_to_hf(params, stack, i, cfg, t)
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = param(params, "lm_head/kernel").T
    return _config(cfg), {name: np.ascontiguousarray(x) for name, x in t.items()}
