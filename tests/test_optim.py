"""Tests for kiln.optim: schedules, weight-decay masking, optimizers and config validation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kiln.errors import KilnError
from kiln.optim import learning_rate_at, make_optimizer, make_schedule, weight_decay_mask


def _cfg(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(
            name="adamw",
            lr=1e-3,
            schedule="constant",
            warmup_fraction=0.0,
            end_lr_fraction=0.1,
            weight_decay=0.0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            momentum=0.9,
            nesterov=False,
            clip_norm=0.0,
            grad_accum_steps=4,
        )
    )
    cfg.update(overrides)
    return cfg


def _step(tx, params, grads, state=None):
    state = tx.init(params) if state is None else state
    updates, state = jax.jit(tx.update)(grads, state, params)
    return optax.apply_updates(params, updates), state


def _np(tree):
    return jax.tree.map(np.asarray, tree)


# --- schedules -------------------------------------------------------------------------------

# lr=2, 10 warmup updates of 110 (100 decay updates), end_lr_fraction=0.1; the step is the
# number of updates done before (0 for the first); values worked out by hand.
_TABLE = {
    "cosine": {0: 0.2, 4: 1.0, 9: 2.0, 34: 2 * (0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),
               59: 1.1, 109: 0.2, 500: 0.2},
    "linear": {0: 0.2, 4: 1.0, 9: 2.0, 34: 2 * (1 - 0.9 * 0.25), 59: 1.1, 109: 0.2, 500: 0.2},
    "rsqrt": {0: 0.2, 4: 1.0, 9: 2.0, 39: 1.0, 89: 2 / 3, 159: 0.5, 999: 0.2},
    "constant": {0: 0.2, 4: 1.0, 9: 2.0, 60: 2.0, 110: 2.0, 500: 2.0},
}  # fmt: skip


def _reference(name, step, lr=2.0, warmup=10, total=110, f=0.1):
    update = step + 1
    if update <= warmup:
        return lr * update / warmup
    t = min(max((update - warmup) / (total - warmup), 0.0), 1.0)
    if name == "cosine":
        return lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * t)))
    if name == "linear":
        return lr * (1 - (1 - f) * t)
    if name == "rsqrt":
        return lr * math.sqrt(max(warmup, 1) / max(update, warmup, 1))
    return lr


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_schedule_key_steps(name):
    cfg = _cfg(schedule=name, lr=2.0, warmup_fraction=10 / 110, end_lr_fraction=0.1)
    sched = make_schedule(cfg, 110)
    for step, want in _TABLE[name].items():
        assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-6), (name, step)
    steps = np.arange(0, 200)
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps, jnp.int32)))
    want = np.array([_reference(name, int(s)) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert learning_rate_at(cfg, 110, 60) == pytest.approx(_reference(name, 60), rel=1e-5)


@pytest.mark.parametrize("name", sorted(_TABLE))
def test_schedule_without_warmup_starts_at_peak(name):
    """No warmup: the first update is one step into the decay (t = 1 / 100)."""
    sched = make_schedule(_cfg(schedule=name, lr=2.0, warmup_fraction=0, end_lr_fraction=0.0), 100)
    first = {"cosine": 1.0 + math.cos(math.pi / 100), "linear": 1.98}.get(name, 2.0)
    assert float(sched(0)) == pytest.approx(first)
    assert _reference(name, 0, warmup=0, total=100, f=0.0) == pytest.approx(first)
    if name == "rsqrt":
        assert float(sched(3)) == pytest.approx(1.0)  # update 4: 2 * sqrt(1 / 4)
    if name == "linear":
        assert float(sched(99)) == pytest.approx(0.0, abs=1e-7)  # the last update


def test_warmup_over_the_whole_run_ends_at_the_peak():
    sched = make_schedule(_cfg(schedule="cosine", lr=2.0, warmup_fraction=1.0), 5)
    got = [float(sched(s)) for s in range(5)]
    np.testing.assert_allclose(got, [0.4, 0.8, 1.2, 1.6, 2.0], rtol=1e-6, atol=1e-7)


def test_warmup_follows_the_number_of_steps():
    """5% warmup: 20 updates of 400, 75 of 1,500; no update has learning rate 0."""
    for total, warmup in ((400, 20), (1500, 75)):
        sched = make_schedule(_cfg(schedule="cosine", lr=1.0, warmup_fraction=0.05), total)
        lrs = np.asarray(jax.vmap(sched)(jnp.arange(total)))
        assert int(np.argmax(lrs)) == warmup - 1 and lrs[warmup - 1] == pytest.approx(1.0)
        assert lrs[0] == pytest.approx(1.0 / warmup) and lrs.min() > 0


# --- weight-decay mask -----------------------------------------------------------------------


def _gpt_params(seed=0):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    dense = lambda i, o: {"kernel": arr(i, o), "bias": arr(o)}
    return {
        "token_embed": {"embedding": arr(11, 4)},
        "position_embed": {"embedding": arr(6, 4)},
        "block_0": {
            "attn": {"query": dense(4, 4), "key": dense(4, 4), "value": dense(4, 4),
                     "out": dense(4, 4)},
            "mlp": {"fc_in": dense(4, 8), "fc_out": dense(8, 4)},
            "norm_1": {"scale": arr(4), "bias": arr(4)},
            "norm_2": {"scale": arr(4), "bias": arr(4)},
        },
        "final_norm": {"scale": arr(4)},
    }  # fmt: skip


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def test_mask_selects_exactly_the_kernels():
    params = _gpt_params()
    mask = _flat(weight_decay_mask(params))
    assert set(mask) == set(_flat(params))
    decayed = {k for k, v in mask.items() if v is True}
    assert all(v is True or v is False for v in mask.values())
    assert decayed == {
        f"block_0/{group}/{layer}/kernel"
        for group, layers in [
            ("attn", ["query", "key", "value", "out"]),
            ("mlp", ["fc_in", "fc_out"]),
        ]
        for layer in layers
    }


def test_mask_on_partitioned_boxes_keeps_structure():
    params = {
        "dense": {
            "kernel": nn.Partitioned(jnp.ones((2, 3)), names=("embed", "mlp")),
            "bias": nn.Partitioned(jnp.ones((3,)), names=("mlp",)),
        },
        "embed": {"embedding": nn.Partitioned(jnp.ones((5, 2)), names=("vocab", "embed"))},
    }
    mask = weight_decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert nn.meta.unbox(mask) == {
        "dense": {"kernel": True, "bias": False},
        "embed": {"embedding": False},
    }
    cfg = _cfg(lr=0.1, weight_decay=0.5)
    new, _ = _step(make_optimizer(cfg, 10), params, jax.tree.map(jnp.zeros_like, params))
    new = nn.meta.unbox(new)
    np.testing.assert_allclose(new["dense"]["kernel"], 0.95)
    np.testing.assert_array_equal(new["dense"]["bias"], 1.0)
    np.testing.assert_array_equal(new["embed"]["embedding"], 1.0)


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_decoupled_decay_only_touches_kernels(name):
    lr, wd = 0.1, 0.5
    params = _gpt_params()
    tx = make_optimizer(_cfg(name=name, lr=lr, weight_decay=wd), 100)
    new, _ = _step(tx, params, jax.tree.map(jnp.zeros_like, params))
    for key, before in _flat(_np(params)).items():
        after = np.asarray(_flat(new)[key])
        if key.endswith("kernel"):
            np.testing.assert_allclose(after, before - lr * wd * before, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(after, before)


# --- optimizers against NumPy references -----------------------------------------------------


def _small_tree(rng):
    return {
        "dense": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
        "norm": {"scale": rng.normal(size=(4,))},
    }


def _to_jax(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def test_adamw_matches_numpy_reference():
    b1, b2, eps, wd = 0.8, 0.95, 1e-3, 0.1
    cfg = _cfg(schedule="linear", lr=1e-2, end_lr_fraction=0.5, b1=b1, b2=b2, eps=eps,
               weight_decay=wd)  # fmt: skip
    lrs = [1e-2 * (1 - 0.5 * t) for t in (0.25, 0.5, 0.75)]  # updates 1-3 of a linear 4
    rng = np.random.default_rng(1)
    params = _small_tree(rng)
    grads = [_small_tree(rng) for _ in lrs]
    tx = make_optimizer(cfg, 4)
    got, state = _to_jax(params), None
    for g in grads:
        got, state = _step(tx, got, _to_jax(g), state)

    m = jax.tree.map(np.zeros_like, params)
    v = jax.tree.map(np.zeros_like, params)
    p = params
    for k, (lr, g) in enumerate(zip(lrs, grads, strict=True), start=1):
        m = jax.tree.map(lambda m_, g_: b1 * m_ + (1 - b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: b2 * v_ + (1 - b2) * g_ * g_, v, g)
        decay = {"dense": {"kernel": wd, "bias": 0.0}, "norm": {"scale": 0.0}}
        p = jax.tree.map(
            lambda p_, m_, v_, d, k=k, lr=lr: p_
            - lr * ((m_ / (1 - b1**k)) / (np.sqrt(v_ / (1 - b2**k)) + eps) + d * p_),
            p, m, v, decay,
        )  # fmt: skip
    for key, want in _flat(p).items():
        np.testing.assert_allclose(_flat(got)[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_numpy_reference(nesterov):
    lr, mu, wd = 0.1, 0.9, 0.2
    cfg = _cfg(name="sgd", lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd)
    rng = np.random.default_rng(2)
    params = _small_tree(rng)
    grads = [_small_tree(rng) for _ in range(2)]
    tx = make_optimizer(cfg, 10)
    got, state = _to_jax(params), None
    for g in grads:
        got, state = _step(tx, got, _to_jax(g), state)

    decay = {"dense": {"kernel": wd, "bias": 0.0}, "norm": {"scale": 0.0}}
    buf = jax.tree.map(np.zeros_like, params)
    p = params
    for g in grads:
        buf = jax.tree.map(lambda b, g_: mu * b + g_, buf, g)
        d = jax.tree.map(lambda b, g_: g_ + mu * b, buf, g) if nesterov else buf
        p = jax.tree.map(lambda p_, d_, w: p_ - lr * (d_ + w * p_), p, d, decay)
    for key, want in _flat(p).items():
        np.testing.assert_allclose(_flat(got)[key], want, rtol=1e-5, atol=1e-6, err_msg=key)


def test_adafactor_decreases_quadratic_loss():
    rng = np.random.default_rng(3)
    target = _to_jax({"w": {"kernel": rng.normal(size=(130, 129)), "bias": rng.normal(size=(7,))}})
    params = jax.tree.map(jnp.zeros_like, target)

    def loss(p):
        return sum(jax.tree.leaves(jax.tree.map(lambda a, b: jnp.sum((a - b) ** 2), p, target)))

    tx = make_optimizer(_cfg(name="adafactor", lr=0.05, schedule="constant"), 100)

    @jax.jit
    def train_step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    state = tx.init(params)
    start = float(loss(params))
    for _ in range(30):
        params, state = train_step(params, state)
    assert np.isfinite(float(loss(params)))
    assert float(loss(params)) < 0.3 * start


# --- clipping --------------------------------------------------------------------------------


def test_clipping_rescales_to_global_norm():
    lr, clip = 0.5, 1.0
    rng = np.random.default_rng(4)
    params = _small_tree(rng)
    grads = jax.tree.map(lambda g: 10 * g, _small_tree(rng))
    norm = math.sqrt(sum(float(np.sum(g**2)) for g in jax.tree.leaves(grads)))
    assert norm > clip
    tx = make_optimizer(_cfg(name="sgd", lr=lr, momentum=0.0, clip_norm=clip), 10)
    got, _ = _step(tx, _to_jax(params), _to_jax(grads))
    want = jax.tree.map(lambda p, g: p - lr * g * clip / norm, params, grads)
    for key, w in _flat(want).items():
        np.testing.assert_allclose(_flat(got)[key], w, rtol=1e-5, atol=1e-6, err_msg=key)

    # Adam on the same grads: clipping must equal feeding the pre-rescaled grads unclipped.
    adam = make_optimizer(_cfg(lr=lr, eps=1.0, clip_norm=clip), 10)
    unclipped = make_optimizer(_cfg(lr=lr, eps=1.0), 10)
    a, _ = _step(adam, _to_jax(params), _to_jax(grads))
    b, _ = _step(
        unclipped, _to_jax(params), _to_jax(jax.tree.map(lambda g: g * clip / norm, grads))
    )
    for key, w in _flat(b).items():
        np.testing.assert_allclose(_flat(a)[key], w, rtol=1e-5, atol=1e-6, err_msg=key)


def test_clipping_leaves_small_grads_untouched():
    lr = 0.5
    rng = np.random.default_rng(5)
    params = _small_tree(rng)
    grads = jax.tree.map(lambda g: 0.01 * g, _small_tree(rng))
    tx = make_optimizer(_cfg(name="sgd", lr=lr, momentum=0.0, clip_norm=1.0), 10)
    got, _ = _step(tx, _to_jax(params), _to_jax(grads))
    want = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    for key, w in _flat(want).items():
        np.testing.assert_allclose(_flat(got)[key], w, rtol=1e-5, atol=1e-7, err_msg=key)


# --- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key", "seen"),
    [
        ({"name": "adam"}, "optim.name", "'adam'"),
        ({"schedule": "exp"}, "optim.schedule", "'exp'"),
        ({"lr": -1e-3}, "optim.lr", "-0.001"),
        ({"lr": float("nan")}, "optim.lr", "nan"),
        ({"warmup_fraction": -0.5}, "optim.warmup_fraction", "-0.5"),
        ({"warmup_fraction": 20}, "optim.warmup_fraction", "20"),
        ({"end_lr_fraction": 1.5}, "optim.end_lr_fraction", "1.5"),
        ({"weight_decay": -0.1}, "optim.weight_decay", "-0.1"),
        ({"b1": 1.0}, "optim.b1", "1.0"),
        ({"b2": -0.5}, "optim.b2", "-0.5"),
        ({"eps": 0.0}, "optim.eps", "0.0"),
        ({"clip_norm": -1.0}, "optim.clip_norm", "-1.0"),
        ({"name": "sgd", "momentum": 1.5}, "optim.momentum", "1.5"),
    ],
)
def test_bad_values_raise_kiln_error(overrides, key, seen):
    with pytest.raises(KilnError) as err:
        make_optimizer(_cfg(**overrides), 100)
    assert f"{key}={seen}" in str(err.value)


def test_error_lists_valid_choices():
    with pytest.raises(KilnError, match="adamw, adafactor, sgd"):
        make_optimizer(_cfg(name="lion"), 100)
    with pytest.raises(KilnError, match="cosine, linear, rsqrt, constant"):
        make_schedule(_cfg(schedule="step"), 100)


def test_missing_key_and_bad_total_steps():
    cfg = _cfg().to_dict()
    del cfg["b2"]
    with pytest.raises(KilnError, match="optim.b2 is missing"):
        make_optimizer(ml_collections.ConfigDict(cfg), 100)
    with pytest.raises(KilnError, match="optim.nesterov"):
        make_optimizer({**cfg, "b2": 0.9, "name": "sgd", "nesterov": "yes"}, 100)
    for bad in (0, -3, 2.5):
        with pytest.raises(KilnError, match="total_steps"):
            make_schedule(_cfg(), bad)


def test_other_optimizers_ignore_adam_keys():
    cfg = _cfg(name="sgd").to_dict()
    for key in ("b1", "b2", "eps"):
        del cfg[key]
    make_optimizer(cfg, 10)  # sgd does not need adam's betas


@pytest.mark.parametrize("name", ["adamw", "sgd", "adafactor"])
def test_state_maps_onto_params_like_the_trainer_does(name):
    params = _gpt_params()
    tx = make_optimizer(_cfg(name=name, weight_decay=0.1, clip_norm=1.0), 10)
    state = jax.eval_shape(tx.init, params)
    tags = jax.tree_util.tree_map_with_path(lambda p, _: "/".join(k.key for k in p), params)
    mapped = optax.tree_map_params(
        tx, lambda _, tag: tag, state, tags, transform_non_params=lambda _: "other"
    )
    assert set(_flat(tags).values()) <= set(jax.tree.leaves(mapped))


def _finetune_cfg(**fields):
    cfg = ml_collections.ConfigDict(
        dict(
            name="sgd",
            lr=0.1,
            schedule="constant",
            warmup_fraction=0.0,
            end_lr_fraction=0.0,
            weight_decay=0.0,
            clip_norm=0.0,
            momentum=0.0,
            nesterov=False,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            head_lr=0.0,
            freeze_body=False,
            layer_decay=1.0,
        )
    )
    cfg.update(fields)
    return cfg


_FT_PARAMS = {
    "token_embed": {"embedding": jnp.ones((3, 2))},
    "block_0": {"mlp": {"wi": {"kernel": jnp.ones((2, 2))}}},
    "block_1": {"mlp": {"wi": {"kernel": jnp.ones((2, 2))}}},
    "final_norm": {"scale": jnp.ones((2,))},
    "classifier": {"kernel": jnp.ones((2, 4))},
}


def _sgd_updates(**fields):
    tx = make_optimizer(_finetune_cfg(**fields), 10, n_layers=2)
    grads = jax.tree.map(jnp.ones_like, _FT_PARAMS)
    updates, _ = tx.update(grads, tx.init(_FT_PARAMS), _FT_PARAMS)
    return jax.tree.map(lambda u: float(u.reshape(-1)[0]), updates)


def test_head_lr_freeze_body_and_layer_decay_scale_sgd_updates_exactly():
    plain = _sgd_updates()
    assert all(v == pytest.approx(-0.1) for v in jax.tree.leaves(plain))
    head = _sgd_updates(head_lr=0.5)
    assert head["classifier"]["kernel"] == pytest.approx(-0.5)
    assert head["block_0"]["mlp"]["wi"]["kernel"] == pytest.approx(-0.1)
    frozen = _sgd_updates(freeze_body=True)
    assert frozen["classifier"]["kernel"] == pytest.approx(-0.1)
    body = [frozen["token_embed"], frozen["block_0"], frozen["block_1"], frozen["final_norm"]]
    assert all(v == 0.0 for v in jax.tree.leaves(body))
    decayed = _sgd_updates(layer_decay=0.5)
    # n = 2 blocks: block_1 -> 0.5, block_0 -> 0.25, embeddings -> 0.125; norm and head -> 1.
    assert decayed["block_1"]["mlp"]["wi"]["kernel"] == pytest.approx(-0.05)
    assert decayed["block_0"]["mlp"]["wi"]["kernel"] == pytest.approx(-0.025)
    assert decayed["token_embed"]["embedding"] == pytest.approx(-0.0125)
    assert decayed["final_norm"]["scale"] == pytest.approx(-0.1)
    assert decayed["classifier"]["kernel"] == pytest.approx(-0.1)
    with pytest.raises(KilnError, match="layer_decay"):
        _sgd_updates(layer_decay=0.0)
