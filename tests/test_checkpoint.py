"""Checkpoint round trips: onto another mesh, with the data iterator, and retention."""

import json

import jax
import ml_collections
import numpy as np
import pytest

from kiln import checkpoint, models, optim, sharding, train
from kiln.data import pipeline, tokenizer
from kiln.errors import KilnError

MODEL = {
    "family": "gpt",
    "vocab_size": 512,
    "d_model": 32,
    "n_layers": 1,
    "n_heads": 4,
    "n_kv_heads": 4,
    "d_ff": 64,
    "max_len": 16,
}
OPTIM = {
    "name": "adamw",
    "lr": 1e-3,
    "schedule": "constant",
    "warmup_fraction": 0.0,
    "end_lr_fraction": 1.0,
    "weight_decay": 0.0,
    "b1": 0.9,
    "b2": 0.99,
    "eps": 1e-8,
    "clip_norm": 0.0,
    "grad_accum_steps": 1,
}


FAMILY_MODELS = {
    "gpt": MODEL,
    "bert": {**MODEL, "family": "bert", "norm_position": "post", "type_vocab_size": 2},
    "t5": {
        **MODEL,
        "family": "t5",
        "position": "none",
        "norm": "rmsnorm",
        "use_bias": False,
        "mlp": "geglu",
        "tie_embeddings": False,
        "scale_attention": False,
    },
}


def state_on(mesh_shape, seed=0, family="gpt"):
    config = ml_collections.ConfigDict({"model": FAMILY_MODELS[family], "optim": OPTIM})
    model = models.build_model(config.model)
    optimizer = optim.make_optimizer(config.optim, 10)
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
    abstract, shardings = train.state_shardings(model, optimizer, mesh, 16)
    state = jax.jit(lambda: train.init_state(model, optimizer, seed, 16), out_shardings=shardings)()
    return state, abstract, shardings


@pytest.mark.parametrize("family", ["gpt", "bert", "t5"])
def test_restore_onto_another_mesh(tmp_path, family):
    state, _, _ = state_on((8, 1, 1), family=family)
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1)
    ckpt.save(5, state)
    ckpt.wait()
    for mesh_shape in [(1, 2, 4), (2, 2, 2)]:
        _, abstract, shardings = state_on(mesh_shape, seed=1, family=family)
        restored = ckpt.restore(5, checkpoint.abstract_like(abstract, shardings))
        jax.tree.map(
            lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
            restored,
            state,
        )
        for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(shardings.params)):
            assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
    ckpt.close()


def test_data_iterator_position_is_saved(tmp_path):
    texts = [f"document number {i} " + "word " * (i % 17) for i in range(300)]
    tok = tokenizer.train_tokenizer(texts, tmp_path / "tok.model", vocab_size=512)
    dataset = pipeline.make_train_dataset(texts, tok, seq_len=16, global_batch_size=4, seed=3)
    straight = iter(dataset)
    expected = [next(straight) for _ in range(6)]
    it = iter(dataset)
    for _ in range(3):
        next(it)
    state, _, _ = state_on((8, 1, 1))
    ckpt = checkpoint.Checkpointer(tmp_path / "ckpt")
    ckpt.save(3, state, it)
    ckpt.wait()
    fresh = iter(dataset)
    _, abstract, shardings = state_on((8, 1, 1))
    ckpt.restore(3, checkpoint.abstract_like(abstract, shardings), data_iter=fresh)
    for want in expected[3:]:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    ckpt.close()


def test_keeps_last_n_plus_every_kth(tmp_path):
    state, _, _ = state_on((8, 1, 1))
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2, keep_every=4, async_save=False)
    for step in range(1, 10):
        ckpt.save(step, state)
    ckpt.wait()
    assert sorted(ckpt.all_steps()) == [4, 8, 9]
    assert ckpt.latest_step() == 9
    ckpt.close()


class _Position:
    """A stand-in iterator: records the state it is set to."""

    state = None

    def set_state(self, state: dict) -> None:
        self.state = state


def test_iterator_position_across_process_counts(tmp_path):
    """A position written by 2 processes is read by 1 (every process holds the same one); a
    position of the old packing streams is refused with a KilnError."""
    folder = tmp_path / "7" / "data_iter"
    folder.mkdir(parents=True)
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        for i in range(2):
            (folder / f"process_{i}-of-2.json").write_text(f'{{"next_index": {10 + i}}}')
        position = _Position()
        ckpt._restore_iterator(7, position)
        assert position.state == {"next_index": 10}
        streams = {"0": {"next_index": 3}}
        for i in range(2):
            (folder / f"process_{i}-of-2.json").write_text(json.dumps({"streams": streams}))
        with pytest.raises(KilnError, match="packing streams"):
            ckpt._restore_iterator(7, _Position())
    finally:
        ckpt.close()
