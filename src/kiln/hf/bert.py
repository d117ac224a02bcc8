"""BERT (`BertForMaskedLM`, the body and pooler of `BertForSequenceClassification`) <-> kiln's
bert family in its classic style.

Post-LN, learned positions, token types, LayerNorm after the embedding sum, biases everywhere,
MLM head (dense + GELU + LayerNorm, output tied to the token embedding, its own bias). HF's
`hidden_act` "gelu" is the exact erf GELU (`gelu_approximate=False`). Linear weights are
[out, in]; kiln's kernels are [in, out] with the heads explicit ([D, H, E], [H, E, D]).
HF's pooler (dense + tanh on [CLS]) and classifier are kiln's `BertClassifier` `pooler` and
`classifier`, the same function.
"""

from typing import Any

import numpy as np

from kiln import models
from kiln.errors import KilnError
from kiln.hf import base_prefix, nest, param, take

MODEL_TYPE = "bert"
HF_CLASS = "BertForMaskedLM"
CLASSIFIER_CLASS = "BertForSequenceClassification"
# hidden_act -> kiln gelu_approximate. "gelu" is exact; the other two are the tanh form.
_ACTIVATIONS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}
# kiln block norm -> HF sublayer of encoder.layer.i.
_BLOCK_NORMS = (
    ("post_attn_norm", "attention.output.LayerNorm"),
    ("post_mlp_norm", "output.LayerNorm"),
)


def _check_config(hf_config: dict[str, Any]) -> None:
    """Refuses the BERT options kiln's bert family does not compute."""
    act = hf_config.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise KilnError(
            f"HF bert config: hidden_act={act!r} is not supported; kiln maps"
            f" {sorted(_ACTIVATIONS)}."
        )
    position = hf_config.get("position_embedding_type", "absolute")
    if position != "absolute":
        raise KilnError(
            f"HF bert config: position_embedding_type={position!r} has no kiln equivalent; only"
            " 'absolute' (learned positions) can be imported."
        )
    for key in ("is_decoder", "add_cross_attention"):
        if hf_config.get(key):
            raise KilnError(f"HF bert config: {key}=True has no kiln equivalent (an encoder).")


def model_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The kiln `model` fields (family included) of a BERT config.json."""
    _check_config(hf_config)
    heads = hf_config["num_attention_heads"]
    return {
        "family": "bert",
        "vocab_size": hf_config["vocab_size"],
        "d_model": hf_config["hidden_size"],
        "n_layers": hf_config["num_hidden_layers"],
        "n_heads": heads,
        "n_kv_heads": heads,
        "d_ff": hf_config["intermediate_size"],
        "max_len": hf_config.get("max_position_embeddings", 512),
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "post",
        "mlp": "gelu",
        "gelu_approximate": _ACTIVATIONS[hf_config.get("hidden_act", "gelu")],
        "use_bias": True,
        "tie_embeddings": True,
        "type_vocab_size": hf_config.get("type_vocab_size", 2),
        "norm_eps": hf_config.get("layer_norm_eps", 1e-12),
        "dropout": hf_config.get("hidden_dropout_prob", 0.1),
        "init_std": hf_config.get("initializer_range", 0.02),
        "scale_attention": True,
        "head_dim": 0,
    }


def _norm(tensors: dict[str, np.ndarray], name: str, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, bias) of the LayerNorm `name`; original TF-converted checkpoints (e.g.
    bert-base-uncased's pytorch_model.bin) call them gamma and beta."""
    if f"{name}.weight" not in tensors and f"{name}.gamma" in tensors:
        return take(tensors, f"{name}.gamma", (d,)), take(tensors, f"{name}.beta", (d,))
    return take(tensors, f"{name}.weight", (d,)), take(tensors, f"{name}.bias", (d,))


def _layer_to_kiln(tensors: dict, hf: str, m: dict, p: dict, k: str) -> None:
    """Fills p[k...] with layer `hf` (e.g. "bert.encoder.layer.0.")."""
    d, h, f = m["d_model"], m["n_heads"], m["d_ff"]
    e = d // h
    for name in ("query", "key", "value"):
        w = take(tensors, f"{hf}attention.self.{name}.weight", (h * e, d))
        p[f"{k}attn/{name}/kernel"] = w.T.reshape(d, h, e)
        b = take(tensors, f"{hf}attention.self.{name}.bias", (h * e,))
        p[f"{k}attn/{name}/bias"] = b.reshape(h, e)
    w = take(tensors, f"{hf}attention.output.dense.weight", (d, h * e))
    p[f"{k}attn/out/kernel"] = w.T.reshape(h, e, d)
    p[f"{k}attn/out/bias"] = take(tensors, f"{hf}attention.output.dense.bias", (d,))
    p[f"{k}mlp/wi/kernel"] = take(tensors, f"{hf}intermediate.dense.weight", (f, d)).T
    p[f"{k}mlp/wi/bias"] = take(tensors, f"{hf}intermediate.dense.bias", (f,))
    p[f"{k}mlp/wo/kernel"] = take(tensors, f"{hf}output.dense.weight", (d, f)).T
    p[f"{k}mlp/wo/bias"] = take(tensors, f"{hf}output.dense.bias", (d,))
    for kiln_norm, hf_norm in _BLOCK_NORMS:
        p[f"{k}{kiln_norm}/scale"], p[f"{k}{kiln_norm}/bias"] = _norm(tensors, hf + hf_norm, d)


def _heads_to_kiln(tensors: dict, m: dict, b: str, p: dict) -> None:
    """The MLM head (cls.predictions.*), pooler and classifier, those the checkpoint has."""
    d, vocab = m["d_model"], m["vocab_size"]
    head = "cls.predictions."
    if f"{head}transform.dense.weight" in tensors:
        decoder = tensors.get(f"{head}decoder.weight")
        embedding = p["token_embed/embedding"]
        if decoder is not None and not np.array_equal(np.asarray(decoder, np.float32), embedding):
            raise KilnError(
                f"HF checkpoint: tensor '{head}decoder.weight' differs from the word"
                " embeddings; kiln's MLM head is tied to them, so it cannot be imported."
            )
        # Tied to decoder.bias, which is the name save_pretrained may keep instead.
        bias = f"{head}bias" if f"{head}bias" in tensors else f"{head}decoder.bias"
        p["mlm_head/bias"] = take(tensors, bias, (vocab,))
        w = take(tensors, f"{head}transform.dense.weight", (d, d))
        p["mlm_head/mlm_transform/kernel"] = w.T
        p["mlm_head/mlm_transform/bias"] = take(tensors, f"{head}transform.dense.bias", (d,))
        scale, shift = _norm(tensors, f"{head}transform.LayerNorm", d)
        p["mlm_head/mlm_norm/scale"], p["mlm_head/mlm_norm/bias"] = scale, shift
    if f"{b}pooler.dense.weight" in tensors:
        p["pooler/kernel"] = take(tensors, f"{b}pooler.dense.weight", (d, d)).T
        p["pooler/bias"] = take(tensors, f"{b}pooler.dense.bias", (d,))
    if "classifier.weight" in tensors:
        classes = len(tensors["classifier.weight"])  # num_labels; take checks the rest.
        p["classifier/kernel"] = take(tensors, "classifier.weight", (classes, d)).T
        p["classifier/bias"] = take(tensors, "classifier.bias", (classes,))


def to_kiln(hf_config: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """kiln `model` fields and parameters of a BERT checkpoint (BertForMaskedLM,
    BertForPreTraining, BertForSequenceClassification or BertModel).

    The parameters hold `mlm_head` when the checkpoint has the MLM head, and `pooler` /
    `classifier` (kiln's `BertClassifier` names) when it has those; the rest is the body.
    """
    m = model_fields(hf_config)
    d, vocab = m["d_model"], m["vocab_size"]
    b = base_prefix(tensors, "bert", "embeddings.word_embeddings.weight")
    emb = f"{b}embeddings."
    p = {
        "token_embed/embedding": take(tensors, f"{emb}word_embeddings.weight", (vocab, d)),
        "position_embed/embedding": take(
            tensors, f"{emb}position_embeddings.weight", (m["max_len"], d)
        ),
    }
    if m["type_vocab_size"]:
        shape = (m["type_vocab_size"], d)
        p["type_embed/embedding"] = take(tensors, f"{emb}token_type_embeddings.weight", shape)
    p["embed_norm/scale"], p["embed_norm/bias"] = _norm(tensors, f"{emb}LayerNorm", d)
    for i in range(m["n_layers"]):
        _layer_to_kiln(tensors, f"{b}encoder.layer.{i}.", m, p, f"block_{i}/")
    _heads_to_kiln(tensors, m, b, p)
    return m, nest(p)


def mismatches(model: dict[str, Any]) -> list[str]:
    """What a kiln bert `model` section would need to be an HF BERT ([] if it is one)."""
    cfg = models.transformer_config(model)
    want = {
        "position": "learned",
        "norm": "layernorm",
        "norm_position": "post",
        "mlp": "gelu",
        "use_bias": True,
        "scale_attention": True,
    }
    problems = [f"model.{k}={v!r}" for k, v in want.items() if getattr(cfg, k) != v]
    if cfg.type_vocab_size < 1:
        problems.append("model.type_vocab_size >= 1 (HF BERT always adds token types)")
    if cfg.n_kv_heads != cfg.n_heads:
        problems.append("model.n_kv_heads=model.n_heads (no grouped-query attention)")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append("model.head_dim=0 (d_model // n_heads)")
    return problems


def _config(cfg: Any, hf_class: str) -> dict[str, Any]:
    """The config.json of an HF BERT class for the kiln layer config `cfg`."""
    return {
        "architectures": [hf_class],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu_new" if cfg.gelu_approximate else "gelu",
        "max_position_embeddings": cfg.max_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "initializer_range": cfg.init_std,
        "position_embedding_type": "absolute",
        "pad_token_id": 0,
        "torch_dtype": "float32",
    }


def _layer_to_hf(params: dict, k: str, cfg: Any, t: dict, hf: str) -> None:
    """Fills t[hf...] with kiln block `k` (e.g. "block_0/")."""
    inner = cfg.n_heads * cfg.head_dim
    for name in ("query", "key", "value"):
        kernel = param(params, f"{k}attn/{name}/kernel").reshape(cfg.d_model, inner)
        t[f"{hf}attention.self.{name}.weight"] = kernel.T
        bias = param(params, f"{k}attn/{name}/bias")
        t[f"{hf}attention.self.{name}.bias"] = bias.reshape(inner)
    out = param(params, f"{k}attn/out/kernel").reshape(inner, cfg.d_model)
    t[f"{hf}attention.output.dense.weight"] = out.T
    t[f"{hf}attention.output.dense.bias"] = param(params, f"{k}attn/out/bias")
    t[f"{hf}intermediate.dense.weight"] = param(params, f"{k}mlp/wi/kernel").T
    t[f"{hf}intermediate.dense.bias"] = param(params, f"{k}mlp/wi/bias")
    t[f"{hf}output.dense.weight"] = param(params, f"{k}mlp/wo/kernel").T
    t[f"{hf}output.dense.bias"] = param(params, f"{k}mlp/wo/bias")
    for kiln_norm, hf_norm in _BLOCK_NORMS:
        t[f"{hf}{hf_norm}.weight"] = param(params, f"{k}{kiln_norm}/scale")
        t[f"{hf}{hf_norm}.bias"] = param(params, f"{k}{kiln_norm}/bias")


def to_hf(model: dict[str, Any], params: dict) -> tuple[dict, dict[str, np.ndarray]]:
    """The config.json and tensors of a kiln classic-style BERT: a BertForMaskedLM, or a
    BertForSequenceClassification for a `BertClassifier`'s parameters (no `mlm_head`)."""
    problems = mismatches(model)
    if problems:
        raise KilnError(f"This kiln model is not an HF BERT: export needs {'; '.join(problems)}.")
    cfg = models.transformer_config(model)
    classifier = "mlm_head" not in params and "classifier" in params
    config = _config(cfg, CLASSIFIER_CLASS if classifier else HF_CLASS)
    t = {
        "bert.embeddings.word_embeddings.weight": param(params, "token_embed/embedding"),
        "bert.embeddings.position_embeddings.weight": param(params, "position_embed/embedding"),
        "bert.embeddings.token_type_embeddings.weight": param(params, "type_embed/embedding"),
        "bert.embeddings.LayerNorm.weight": param(params, "embed_norm/scale"),
        "bert.embeddings.LayerNorm.bias": param(params, "embed_norm/bias"),
    }
    for i in range(cfg.n_layers):
        _layer_to_hf(params, f"block_{i}/", cfg, t, f"bert.encoder.layer.{i}.")
    if classifier:
        config["num_labels"] = param(params, "classifier/kernel").shape[1]
        t["bert.pooler.dense.weight"] = param(params, "pooler/kernel").T
        t["bert.pooler.dense.bias"] = param(params, "pooler/bias")
        t["classifier.weight"] = param(params, "classifier/kernel").T
        t["classifier.bias"] = param(params, "classifier/bias")
    else:  # The decoder weight and bias are tied to these; save_pretrained omits them.
        head = "cls.predictions."
        t[f"{head}bias"] = param(params, "mlm_head/bias")
        t[f"{head}transform.dense.weight"] = param(params, "mlm_head/mlm_transform/kernel").T
        t[f"{head}transform.dense.bias"] = param(params, "mlm_head/mlm_transform/bias")
        t[f"{head}transform.LayerNorm.weight"] = param(params, "mlm_head/mlm_norm/scale")
        t[f"{head}transform.LayerNorm.bias"] = param(params, "mlm_head/mlm_norm/bias")
    return config, {name: np.ascontiguousarray(x) for name, x in t.items()}
