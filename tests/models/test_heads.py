"""Classification heads: the pooled position, the head computed by hand, padding invariance."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kiln.models import bert, gpt, heads
from kiln.models.layers import TransformerConfig

CFG = TransformerConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=64, max_len=16
)
TOKENS = np.array([[5, 9, 12, 30, 3, 0, 0, 0], [5, 7, 8, 9, 10, 11, 12, 3]], np.int32)
SEGMENTS = (TOKENS != 0).astype(np.int32)


def test_last_positions_by_hand():
    segments = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 2, 2, 0, 0]])
    assert heads.last_positions(segments).tolist() == [2, 4, 0, 2]


def _params(model):
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(TOKENS), jnp.asarray(SEGMENTS))
    return nn.unbox(variables["params"])


def test_gpt_classifier_reads_the_last_real_token():
    model = heads.GPTClassifier(CFG, num_classes=5)
    params = _params(model)
    logits = np.asarray(model.apply({"params": params}, TOKENS, SEGMENTS))
    hidden = np.asarray(model.apply({"params": params}, TOKENS, SEGMENTS, method=gpt.GPT.hidden))
    last = [4, 7]  # Row 0 ends with eos at 4, then padding; row 1 is full.
    kernel, bias = (np.asarray(params["classifier"][k]) for k in ("kernel", "bias"))
    expected = np.stack([hidden[i, last[i]] for i in range(2)]) @ kernel + bias
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    # More padding after the last token changes nothing (a causal model never sees it).
    padded = np.pad(TOKENS, [(0, 0), (0, 4)])
    more = model.apply({"params": params}, padded, (padded != 0).astype(np.int32))
    np.testing.assert_allclose(np.asarray(more), logits, rtol=1e-5, atol=1e-5)


def test_bert_classifier_pools_cls_through_tanh():
    model = heads.BertClassifier(CFG, num_classes=3)
    params = _params(model)
    logits = np.asarray(model.apply({"params": params}, TOKENS, SEGMENTS))
    hidden = np.asarray(model.apply({"params": params}, TOKENS, SEGMENTS, method=bert.BERT.encode))
    pooler, clf = params["pooler"], params["classifier"]
    pooled = np.tanh(hidden[:, 0] @ np.asarray(pooler["kernel"]) + np.asarray(pooler["bias"]))
    expected = pooled @ np.asarray(clf["kernel"]) + np.asarray(clf["bias"])
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert "mlm_head" not in params  # The pre-training head is not part of the classifier.
