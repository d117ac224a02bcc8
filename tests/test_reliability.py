"""Reliability (docs/reliability.md): damaged checkpoints, failed saves, divergence, kill -9.

The tests of the failures issue 17 lists fail on the code before it: a flipped bit restored
silently, a truncated file giving a traceback, a full disk surfacing at the next save among
orbax tracebacks, a divergence naming a checkpoint that had already diverged. The rest pin
what was added (rollback, the verify tool) and what already held (kill -9).
"""

import errno
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln import checkpoint, config_lib, divergence, integrity, restore, run, train
from kiln.errors import KilnError
from kiln.tools import checkpoints as checkpoints_tool
from test_checkpoint import state_on

REPO = pathlib.Path(__file__).resolve().parents[1]


# -- Damaged checkpoints ------------------------------------------------------------------------


def _largest_array_file(folder: pathlib.Path) -> pathlib.Path:
    files = [
        pathlib.Path(p) for p in glob.glob(str(folder / "state" / "**" / "d" / "*"), recursive=True)
    ]
    return max(files, key=lambda p: p.stat().st_size)


def _flip_bit(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated": lambda f: os.truncate(
        _largest_array_file(f), _largest_array_file(f).stat().st_size // 2
    ),
    "deleted": lambda f: _largest_array_file(f).unlink(),
    "flipped_bit": lambda f: _flip_bit(_largest_array_file(f)),
    "garbage_metadata": lambda f: (f / "state" / "_METADATA").write_text("{garbage"),
    "garbage_record": lambda f: (f / integrity.RECORD).write_text("not json"),
}
REASONS = {
    "truncated": "truncated",
    "deleted": "missing",
    "flipped_bit": "checksum mismatch",
    "garbage_metadata": "_METADATA",
    "garbage_record": "unreadable",
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
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_a_flipped_bit_is_never_restored_silently(tmp_path, two_states):
    """Before: orbax restored the flipped value (no error); now the checksum catches it."""
    _save_two(tmp_path, two_states)
    _flip_bit(_largest_array_file(tmp_path / "2"))
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
    DAMAGE[kind](tmp_path / "2")
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
    assert "checkpoint step 2" in damaged and REASONS[kind] in damaged and "2.damaged" in damaged
    assert "fell back to checkpoint step 1" in fell_back


def test_no_intact_checkpoint_is_one_error(tmp_path, two_states):
    _save_two(tmp_path, two_states)
    DAMAGE["deleted"](tmp_path / "1")
    DAMAGE["flipped_bit"](tmp_path / "2")
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
    _flip_bit(_largest_array_file(source / "checkpoints" / "2"))
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
    os.truncate(_largest_array_file(source / "checkpoints" / "2"), 10)
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


# -- Divergence ---------------------------------------------------------------------------------


def _train_section(**fields):
    section = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny").train
    for key, value in fields.items():
        section[key] = value
    return section


def test_guard_condemns_the_state_that_is_bad():
    guard = divergence.Guard.from_config(_train_section())
    fine = {"loss": 5.0, "grad_norm": 1.0, "update_norm": 0.1, "param_norm": 30.0}
    guard.check(1, fine)
    with pytest.raises(divergence.Diverged) as caught:  # The update broke the new state.
        guard.check(7, {**fine, "param_norm": float("inf")})
    assert caught.value.suspect_from == 7 and "param_norm inf" in caught.value.why
    with pytest.raises(divergence.Diverged) as caught:  # The state before gave a NaN loss.
        guard.check(7, {**fine, "loss": float("nan")})
    assert caught.value.suspect_from == 6


def test_guard_loss_spike_and_its_record():
    guard = divergence.Guard.from_config(_train_section(max_loss_spike=3.0))
    for step in range(1, 11):
        guard.check(step, {"loss": 4.0 - 0.1 * step})
    guard.check(11, {"loss": 8.0})  # 2.6x the running mean (~3.05): not a spike.
    with pytest.raises(divergence.Diverged, match=r"x its running mean") as caught:
        guard.check(12, {"loss": 50.0})
    assert caught.value.suspect_from == 11
    again = divergence.Guard.from_config(_train_section(max_loss_spike=3.0), guard.as_record())
    assert again == guard
    assert not guard.can_roll_back()  # Policy "stop".


@pytest.mark.parametrize(
    "fields, key",
    [
        ({"on_nonfinite": "ignore"}, "train.on_nonfinite"),
        ({"max_loss_spike": 0.5}, "train.max_loss_spike"),
        ({"max_loss_spike": float("inf")}, "train.max_loss_spike"),
        ({"max_rollbacks": -1}, "train.max_rollbacks"),
    ],
)
def test_guard_fields_are_validated(fields, key):
    with pytest.raises(KilnError, match=key):
        divergence.Guard.from_config(_train_section(**fields))


def test_train_step_reports_the_new_state_and_scales_the_update():
    from kiln import build
    from test_train import synthetic_batch

    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.data.seq_len = config.model.max_len = 16
    config.data.global_batch_size = 8
    built = build.build(config)
    batch = run.to_global(synthetic_batch(0), built.mesh, 8)
    full = built.train_step(built.fresh_state(0), batch)[1]
    half = built.train_step(built.fresh_state(0), batch, 0.5)[1]
    assert float(half["update_norm"]) == float(full["update_norm"]) / 2  # Exactly: a power of 2.
    assert float(half["lr"]) == float(full["lr"]) / 2
    assert 0 < float(full["param_norm"]) < 1e3


# -- Whole runs ---------------------------------------------------------------------------------


def tiny_run(steps: int, **fields):
    """A seconds-long GPT run; `fields` as section__key=value."""
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.data.data_dir = "data/tiny"
    config.model.vocab_size = 512
    config.model.max_len = config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.eval.batches = 1
    config.eval.sample_prompt = ""
    config.tokenizer.max_sentences = 2000
    config.train.steps = steps
    config.train.log_every = 1
    config.checkpoint.every = 1
    config.optim.schedule = "constant"
    config.optim.warmup_fraction = 0.0
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def _logged(workdir, key: str) -> dict[int, float]:
    """The last logged value of `key` at each step (a step trained again is logged again)."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if key in row:
            out[row["step"]] = row[key]
    return out


def losses(workdir) -> dict[int, float]:
    return _logged(workdir, "train/loss")


def saved_params(workdir, step):
    ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / "checkpoints")
    try:
        return ckpt.restore_raw(step)["params"]
    finally:
        ckpt.close()


def steps_on_disk(workdir) -> list[int]:
    return sorted(
        int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit()
    )


@pytest.mark.slow
def test_corrupted_latest_checkpoint_resume_is_bit_identical(tmp_path, capsys):
    """Stopped at 4, checkpoint 4 damaged: the resume falls back to 2, replays 3-4 and ends
    bit-identical to a run never interrupted (before: the flipped value was restored)."""
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    fields = {"checkpoint__every": 2, "model__dropout": 0.1}
    run.train_and_evaluate(tiny_run(6, **fields), straight)
    run.train_and_evaluate(tiny_run(6, train__stop_after=4, **fields), resumed)
    _flip_bit(_largest_array_file(pathlib.Path(resumed) / "checkpoints" / "4"))
    capsys.readouterr()
    run.train_and_evaluate(tiny_run(6, **fields), resumed)
    out = capsys.readouterr().out
    assert "checkpoint step 4" in out and "checksum mismatch" in out
    assert "resuming from this workdir's checkpoint at step 2" in out
    assert losses(resumed) == losses(straight)
    want, got = saved_params(straight, 6), saved_params(resumed, 6)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, got)


@pytest.mark.slow
def test_divergence_names_a_checkpoint_that_is_actually_good(tmp_path):
    """Resumed with a huge learning rate, the run stops. Before: it named (and had saved) a
    checkpoint whose parameters were already ~1e17, and resuming with a sane rate from it
    diverged again. Now no diverged state is saved, and the resume trains on."""
    workdir = str(tmp_path / "run")
    run.train_and_evaluate(tiny_run(8, train__stop_after=3), workdir)
    with pytest.raises(KilnError) as caught:
        run.train_and_evaluate(tiny_run(8, optim__lr=1e17), workdir)
    message = str(caught.value)
    assert "training diverged" in message and "Last good checkpoint: step 3" in message
    assert steps_on_disk(workdir) == [1, 2, 3]
    norm = float(
        jnp.sqrt(
            sum(
                jnp.sum(x.astype(jnp.float32) ** 2)
                for x in jax.tree.leaves(saved_params(workdir, 3))
            )
        )
    )
    assert norm < 1e3
    summary = run.train_and_evaluate(tiny_run(8), workdir)  # The sane rate again.
    assert summary["step"] == 8 and all(np.isfinite(v) for v in losses(workdir).values())
    assert losses(workdir)[8] < losses(workdir)[1]


def _poisoned(at_step: int, metric: str, below_scale: float = 0.0):
    """train.train_step, but step `at_step` run with a learning-rate scale above `below_scale`
    returns NaN in `metric` (a bad batch at full learning rate); "param_norm" also poisons the
    parameters."""
    real = train.train_step

    def step(state, batch, lr_scale=1.0, **kwargs):
        new, metrics = real(state, batch, lr_scale, **kwargs)
        hit = (state.step == at_step - 1) & (jnp.asarray(lr_scale) > below_scale)
        metrics = {**metrics, metric: jnp.where(hit, jnp.nan, metrics[metric])}
        if metric == "param_norm":
            params = jax.tree.map(lambda p: jnp.where(hit, jnp.nan, p), new.params)
            new = new.replace(params=params)
        return new, metrics

    return step


@pytest.mark.slow
def test_stop_sets_aside_checkpoints_of_suspect_states(tmp_path, monkeypatch):
    """A NaN loss at step 5 condemns the state after step 4 (its loss came from it): the
    checkpoint at 4 is moved aside and 3 is named."""
    monkeypatch.setattr(train, "train_step", _poisoned(5, "loss"))
    workdir = tmp_path / "run"
    with pytest.raises(KilnError) as caught:
        run.train_and_evaluate(tiny_run(8), str(workdir))
    message = str(caught.value)
    assert message.startswith("Non-finite loss nan at step 5; training diverged")
    assert "Last good checkpoint: step 3" in message and "[4]" in message
    assert steps_on_disk(workdir) == [2, 3]  # checkpoint.keep=3: 2, 3 and 4 until the stop.
    assert (workdir / "checkpoints" / "4.diverged").is_dir()


@pytest.mark.slow
def test_rollback_halves_the_rate_skips_the_batches_and_is_bounded(tmp_path, monkeypatch, capsys):
    """Bad at step 5 until the learning-rate scale is 1/4: two rollbacks to checkpoint 4,
    each halving the scale; the run then finishes. With max_rollbacks=1 it stops instead."""
    monkeypatch.setattr(train, "train_step", _poisoned(5, "param_norm", below_scale=0.3))
    workdir = tmp_path / "run"
    fields = {"checkpoint__every": 2, "train__on_nonfinite": "rollback"}
    summary = run.train_and_evaluate(tiny_run(8, **fields), str(workdir))
    assert summary["step"] == 8
    out = capsys.readouterr().out
    assert out.count("Rolled back to checkpoint step 4") == 2
    assert "learning-rate scale now 0.25" in out and "steps 5-6 are skipped" in out
    lr = _logged(workdir, "train/lr")
    assert lr[4] == pytest.approx(4 * lr[8])  # Constant schedule; 1/4 of it after rollbacks.
    record = integrity.loop_state(str(workdir / "checkpoints" / "8"))
    assert record["lr_scale"] == 0.25 and record["rollbacks"] == 2
    # The data went on: 8 steps + 2 x 2 skipped batches (the bad step and the one after it).
    position = json.loads(
        (workdir / "checkpoints" / "8" / "data_iter" / "process_0-of-1.json").read_text()
    )
    assert position["next_index"] == 12
    run.train_and_evaluate(tiny_run(10, **fields), str(workdir))  # Resumed: the scale stays.
    assert _logged(workdir, "train/lr")[10] == lr[8]
    with pytest.raises(KilnError, match="stopped after 1 rollback"):
        run.train_and_evaluate(tiny_run(8, train__max_rollbacks=1, **fields), str(tmp_path / "b"))


# -- kill -9 ------------------------------------------------------------------------------------

KILL_FLAGS = [
    "--config=experiments/gpt/pretrain.py:size=tiny",
    "--config.data.data_dir=data/tiny",
    "--config.model.vocab_size=512",
    "--config.data.seq_len=32",
    "--config.model.max_len=32",
    "--config.data.global_batch_size=8",
    "--config.eval.batches=1",
    "--config.eval.sample_prompt=",
    "--config.tokenizer.max_sentences=2000",
    "--config.train.steps=8",
    "--config.train.log_every=1",
    "--config.checkpoint.every=1",
    "--config.model.dropout=0.1",
]


def kiln_main(workdir, *flags, kill_after: str | None = None) -> subprocess.CompletedProcess | None:
    """`python -m kiln.main` on `workdir`; with `kill_after`, SIGKILLed as soon as a line
    starting with it is printed (a point in the run, not a time)."""
    cmd = [sys.executable, "-m", "kiln.main", f"--workdir={workdir}", *KILL_FLAGS, *flags]
    if kill_after is None:
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    for line in proc.stdout:
        if line.startswith(kill_after):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    proc.stdout.close()
    return None


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory) -> pathlib.Path:
    """The 8-step run of `KILL_FLAGS`, never interrupted."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    result = kiln_main(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["step 3/8", "step 6/8"])
def test_kill_9_then_resume_is_bit_identical(tmp_path, straight_run, kill_after):
    """Killed right after a step's line (the checkpoint of the step before is usually still
    being written), then resumed: the same losses and parameters as a run never killed."""
    straight, killed = straight_run, tmp_path / "killed"
    kiln_main(killed, kill_after=kill_after)
    assert not (killed / "summary.json").exists()
    result = kiln_main(killed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses(killed) == losses(straight)
    want, got = saved_params(straight, 8), saved_params(killed, 8)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want, got)
