"""Reliability of whole runs (docs/reliability.md): divergence, a resume past a damaged
checkpoint, kill -9. Damaged checkpoints and failed saves as such: tests/test_checkpoint.py.

The divergence tests of issue 17's failure fail on the code before it (it named, and had saved,
a checkpoint that had already diverged); the rest pin what was added (rollback) and what
already held (kill -9).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kiln import checkpoint, config_lib, divergence, integrity, run, train
from kiln.errors import KilnError
from test_checkpoint import flip_bit, largest_array_file

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    flip_bit(largest_array_file(pathlib.Path(resumed) / "checkpoints" / "4"))
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
    "--config=experiments/gpt/pretrain.py:size=micro",
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
