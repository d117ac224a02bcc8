import jax
import numpy as np
import pytest

from kiln import config_lib, flops, models


def model_section(**overrides):
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    model = config.model.to_dict()
    model.update(overrides)
    return model


def kernel_sizes(model):
    params = jax.eval_shape(
        lambda: models.build_model(model).init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))
    )["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(
        int(np.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape))
        for path, leaf in leaves
        if "kernel" in jax.tree_util.keystr(path)
    )


def test_matmul_params_count_the_model_kernels_plus_the_output_projection():
    styles = ({}, {"mlp": "swiglu", "n_kv_heads": 2, "tie_embeddings": False}, {"head_dim": 48})
    for style in styles:
        model = model_section(**style)
        head = 0 if not model["tie_embeddings"] else model["vocab_size"] * model["d_model"]
        assert flops.matmul_params(model) == kernel_sizes(model) + head


def test_train_flops_formula():
    model = model_section()
    seq_len = 128
    expected = 6 * flops.matmul_params(model) + 12 * model["n_layers"] * seq_len * model["d_model"]
    assert flops.train_flops_per_token(model, seq_len) == expected


@pytest.mark.parametrize("head_dim", [0, 48])
def test_forward_flops_agree_with_xla_cost_analysis(head_dim):
    model = model_section(dropout=0.0, head_dim=head_dim)
    seq_len, rows = 64, 2
    module = models.build_model(model)
    tokens = np.zeros((rows, seq_len), np.int32)
    params = module.init(jax.random.PRNGKey(0), tokens)["params"]
    compiled = jax.jit(lambda p, t: module.apply({"params": p}, t)).lower(params, tokens).compile()
    xla = compiled.cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    ours = flops.train_flops_per_token(model, seq_len) / 3 * rows * seq_len
    # XLA also counts softmax, norms and activations; matmuls dominate.
    assert 0.9 < xla["flops"] / ours < 1.3, (xla["flops"], ours)


def test_bert_head_counted_at_predicted_positions_only():
    """With `predict_positions` the head is counted at those positions only: the difference
    from scoring every position is its matmuls on the others, and XLA's count of the forward
    pass that predicts at those positions agrees with the formula."""
    config = config_lib.load_config("experiments/bert/pretrain.py:size=tiny")
    model = {**config.model.to_dict(), "dropout": 0.0}
    rows, seq_len, predicted = 2, 64, 10
    d, vocab = model["d_model"], model["vocab_size"]
    shapes = {"inputs": (rows, seq_len)}
    _, dense = flops.step_cost(model, shapes, rows)
    _, sparse = flops.step_cost(model, {**shapes, "predict_positions": (rows, predicted)}, rows)
    assert dense - sparse == 3 * rows * (seq_len - predicted) * 2 * (d * vocab + d * d)
    module = models.build_model(model)
    tokens, chosen = np.zeros((rows, seq_len), np.int32), np.zeros((rows, predicted), np.int32)
    params = module.init(jax.random.PRNGKey(0), inputs=tokens)["params"]
    forward = jax.jit(lambda p, t, c: module.apply({"params": p}, t, predict_positions=c))
    xla = forward.lower(params, tokens, chosen).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, list) else xla
    assert 0.9 < xla["flops"] / (sparse / 3) < 1.3, (xla["flops"], sparse / 3)
