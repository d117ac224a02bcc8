"""Checkpoint round trips: onto another mesh, with the data iterator, and retention. Damaged
checkpoints and failed saves (docs/reliability.md): before issue 17 a flipped bit restored
silently, a truncated file gave a traceback, and a full disk surfaced at the next save among
orbax tracebacks; each test here fails on that code."""

import errno
import glob
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kiln import checkpoint, config_lib, integrity, models, optim, restore, sharding, train
from kiln.data import pipeline, tokenizer
from kiln.errors import KilnError
from kiln.tools import checkpoints as checkpoints_tool

REPO = pathlib.Path(__file__).resolve().parents[1]

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


# -- Damaged checkpoints ------------------------------------------------------------------------


def largest_array_file(folder: pathlib.Path) -> pathlib.Path:
    files = [
        pathlib.Path(p) for p in glob.glob(str(folder / "state" / "**" / "d" / "*"), recursive=True)
    ]
    return max(files, key=lambda p: p.stat().st_size)


def flip_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: pathlib.Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


# Kinds of damage to a checkpoint folder, and a word the log must use for each.
DAMAGE = {
    "truncated": (lambda f: _truncate(largest_array_file(f)), "truncated"),
    "deleted": (lambda f: largest_array_file(f).unlink(), "missing"),
    "flipped_bit": (lambda f: flip_bit(largest_array_file(f)), "checksum mismatch"),
    "garbage_metadata": (lambda f: (f / "state/_METADATA").write_text("{"), "_METADATA"),
    "garbage_record": (lambda f: (f / integrity.RECORD).write_text("{"), "unreadable"),
}


@pytest.fixture(scope="module")
def two_states():
    """Two different train states (steps 1 and 2 of a pretend run) and the restore target."""
    first, abstract, shardings = state_on((8, 1, 1), seed=0)
    second, _, _ = state_on((8, 1, 1), seed=1)
    return first, second, checkpoint.abstract_like(abstract, shardings)


def _save_two(directory, two_states, loop1: dict | None = None) -> None:
    first, second, _ = two_states
    ckpt = checkpoint.Checkpointer(directory, keep=3)
    ckpt.save(1, first, loop=loop1)
    ckpt.save(2, second)
    ckpt.close()


def _equal(a, b) -> bool:
    return all(map(np.array_equal, jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_flipped_bit_is_never_restored_silently(tmp_path, two_states):
    """Before: orbax restored the flipped value (no error); now the checksum catches it."""
    _save_two(tmp_path, two_states)
    flip_bit(largest_array_file(tmp_path / "2"))
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        with pytest.raises(KilnError, match=r"step 2 .* is damaged: .*checksum mismatch"):
            ckpt.restore(2, two_states[2])
        assert _equal(ckpt.restore(1, two_states[2]), two_states[0])
    finally:
        ckpt.close()


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(tmp_path, two_states, kind):
    _save_two(tmp_path, two_states, loop1={"lr_scale": 0.5})
    damage, reason = DAMAGE[kind]
    damage(tmp_path / "2")
    logged = []
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        step, state = ckpt.restore_latest(two_states[2], log=logged.append)
        assert step == 1 and _equal(state, two_states[0])
        assert ckpt.loop_state(1) == {"lr_scale": 0.5}
        assert ckpt.all_steps() == [1]  # The damaged one is no longer a step ...
    finally:
        ckpt.close()
    assert (tmp_path / "2.damaged").is_dir()  # ... but kept for inspection.
    damaged, fell_back = logged
    assert "checkpoint step 2" in damaged and reason in damaged and "2.damaged" in damaged
    assert "fell back to checkpoint step 1" in fell_back


def test_no_intact_checkpoint_is_one_error(tmp_path, two_states):
    _save_two(tmp_path, two_states)
    largest_array_file(tmp_path / "1").unlink()
    flip_bit(largest_array_file(tmp_path / "2"))
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        with pytest.raises(
            KilnError, match=r"No intact checkpoint .*steps \[2, 1\] are all damaged"
        ):
            ckpt.restore_latest(two_states[2], log=lambda _: None)
    finally:
        ckpt.close()


def test_a_checkpoint_without_record_is_parsed_and_its_values_checked(tmp_path, two_states):
    """A checkpoint of a kiln before records: garbage metadata and NaN parameters are caught
    (before, NaN parameters restored silently and the run ended with loss nan)."""
    first, second, target = two_states
    nan_params = second.replace(params=jax.tree.map(lambda p: p * jnp.nan, second.params))
    ckpt = checkpoint.Checkpointer(tmp_path, keep=5)
    for step, state in ((1, first), (2, nan_params), (3, second)):
        ckpt.save(step, state)
    ckpt.close()
    for step in (1, 2, 3):
        (tmp_path / str(step) / integrity.RECORD).unlink()
    (tmp_path / "3" / "state" / "_METADATA").write_text("{garbage")
    logged = []
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        step, state = ckpt.restore_latest(target, log=logged.append)
    finally:
        ckpt.close()
    assert step == 1 and _equal(state, first)
    assert "_METADATA is not valid JSON" in logged[0] and "NaN or Inf" in logged[1]


def _source_run(tmp_path, two_states) -> pathlib.Path:
    """A finished run's workdir (config.json + checkpoints 1 and 2) to fine-tune from."""
    source = tmp_path / "source"
    _save_two(source / "checkpoints", two_states)
    config_lib.save_json(
        config_lib.load_config("experiments/gpt/pretrain.py:size=tiny"), source / "config.json"
    )
    return source


def test_init_from_skips_a_damaged_latest_and_refuses_a_damaged_step(tmp_path, two_states):
    source = _source_run(tmp_path, two_states)
    flip_bit(largest_array_file(source / "checkpoints" / "2"))
    init = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny").init_from
    init.workdir = str(source)
    assert restore.resolve(init).step == 1  # The newest intact; the damage is logged.
    assert (source / "checkpoints" / "2").is_dir()  # Another run's folder: left as it is.
    init.step = 2
    chosen = restore.resolve(init)
    ckpt = checkpoint.Checkpointer(source / "checkpoints")
    try:
        with pytest.raises(KilnError, match="step 2 .* is damaged"):
            ckpt.restore_params(chosen.step, two_states[2].params)
    finally:
        ckpt.close()


def test_verify_tool_lists_each_checkpoint(tmp_path, two_states, capsys):
    source = _source_run(tmp_path, two_states)
    assert checkpoints_tool.main(["--verify", str(source)]) == 0
    assert "step 1: ok" in capsys.readouterr().out
    os.truncate(largest_array_file(source / "checkpoints" / "2"), 10)
    (source / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir()
    assert checkpoints_tool.main(["--verify", str(source / "checkpoints")]) == 1
    out = capsys.readouterr().out
    assert "step 1: ok" in out and "step 2: damaged: state/" in out and "truncated" in out
    assert "unfinished save" in out


# -- Failed saves -------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/pretend/_CHECKPOINT_METADATA")


def test_disk_full_mid_save_is_one_error_at_that_save(tmp_path, two_states, monkeypatch, capfd):
    """Before: the OSError (in orbax's commit thread) surfaced at the next save, as orbax
    tracebacks. Now `poll`, called every step, raises one KilnError naming this save."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    first, second, target = two_states
    ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
    ckpt.save(1, first)
    ckpt.save(2, second)
    ckpt.wait()
    monkeypatch.setattr(async_checkpointer.AsyncCheckpointer, "_save_step_metadata", _no_space)
    ckpt.save(3, second)  # Returns at once; the write fails in the background.
    with pytest.raises(KilnError) as caught:
        for _ in range(60_000):  # Until the background save has ended (no time limit).
            ckpt.poll()
            time.sleep(0.01)
    message = str(caught.value)
    assert "Saving checkpoint step 3" in message and "the disk is full (ENOSPC)" in message
    assert "free" in message and "steps [1, 2]) are intact" in message
    ckpt.close()  # Already reported: closing does not raise it again.
    monkeypatch.undo()
    assert "Traceback" not in capfd.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["1", "2"]  # keep=2 deleted nothing; no partial.
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
        assert ckpt.restore_latest(target, log=print)[0] == 2
    finally:
        ckpt.close()


def _make_read_only(folder: pathlib.Path) -> bool:
    """chmod, plus the immutable flag as root (whom permissions do not stop); False if neither
    makes the folder unwritable here."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / "probe").mkdir()
    except OSError:
        return True
    (folder / "probe").rmdir()
    return False


def test_read_only_checkpoint_folder_is_one_error(tmp_path, two_states, capfd):
    first, second, _ = two_states
    ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
    ckpt.save(1, first)
    ckpt.wait()
    read_only = _make_read_only(tmp_path)
    try:
        if not read_only:
            pytest.skip("cannot make a folder read-only here")
        with pytest.raises(
            KilnError, match=r"Saving checkpoint step 2 .* failed: .*(EACCES|EPERM)"
        ):
            ckpt.save(2, second)  # Raised by the save itself: it makes its folders first.
        ckpt.close()
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], capture_output=True)
        tmp_path.chmod(0o755)
    assert "Traceback" not in capfd.readouterr().err
    assert integrity.check(str(tmp_path / "1")) is None


FILE_SIZE_LIMIT = """
import os, resource, signal, sys
sys.path.insert(0, "tests")
import conftest
from test_checkpoint import state_on
from kiln import checkpoint
from kiln.errors import KilnError
state, _, _ = state_on((8, 1, 1))
ckpt = checkpoint.Checkpointer(sys.argv[1], keep=2)
ckpt.save(1, state)
ckpt.wait()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # Files past 4 KiB fail: EFBIG.
try:
    ckpt.save(2, state)
    ckpt.wait()
except KilnError as e:
    print("KilnError:", e, flush=True)
ckpt.close()
"""


def test_a_real_writer_failure_is_one_error_without_tracebacks(tmp_path):
    """tensorstore's own write fails (a file-size limit, no root needed): before, seven orbax
    tracebacks and dozens of "Event loop is closed"; now one KilnError and nothing else."""
    result = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMIT, str(tmp_path / "ckpt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "KilnError: Saving checkpoint step 2" in result.stdout and "EFBIG" in result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Event loop is closed" not in result.stderr
    assert integrity.check(str(tmp_path / "ckpt" / "1")) is None


def test_asyncio_reports_about_orbax_tasks_are_dropped_and_others_kept(caplog):
    """asyncio logs "Task exception was never retrieved" for an orbax write task whenever the
    task is collected (timing-dependent): kiln drops it like orbax's own error logs."""
    import logging

    from kiln import integrity

    integrity.quiet_orbax_errors()
    logger = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        path = os.path.join("site-packages", "orbax", "checkpoint", "serialization.py")
        logger.error(f"Task exception was never retrieved\nfuture: <Task coro=<w() at {path}:1>>")
        logger.error("an asyncio error of another library")
    assert [r.getMessage() for r in caplog.records] == ["an asyncio error of another library"]
