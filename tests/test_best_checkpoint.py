"""Model selection in a run (kiln.selection, kiln.best): task metrics at evaluations, the best
validation checkpoint kept and scored, early stopping, and resumes deciding alike.

The validation accuracy the selector sees is scripted per step (the real evaluation runs; its
accuracy is replaced), so the peak is where the test puts it; everything else is a real tiny
BERT fine-tune on wn_lexname."""

import json
import os
import shutil

import ml_collections
import pytest

from kiln import arms, config_lib, run, selection, validation
from kiln import workdir as workdir_lib
from kiln.errors import KilnError

pytestmark = pytest.mark.slow

# Validation accuracy by step as the selector sees it: peaks at step 2.
SCRIPT = {1: 0.1, 2: 0.5, 3: 0.4, 4: 0.3, 5: 0.2, 6: 0.45}
_REAL_VALIDATE = run._validate


def _scripted(r, params, step=0):
    out = _REAL_VALIDATE(r, params, step)
    if step in SCRIPT:
        out["accuracy"] = SCRIPT[step]
    return out


@pytest.fixture(autouse=True)
def scripted_accuracy(monkeypatch):
    monkeypatch.setattr(run, "_validate", _scripted)


def _config(tokenizer: str = "", family: str = "bert", **fields):
    pretrain = config_lib.load_config(f"experiments/{family}/pretrain.py:size=tiny")
    pretrain.data.data_dir = "data/tiny"
    pretrain.model.vocab_size = 512
    pretrain.model.max_len = 32
    pretrain.tokenizer.max_sentences = 2000
    config = arms.finetune_stage(
        pretrain,
        task="wn_lexname",
        train_examples=40,
        epochs=1,
        lr=1e-3,
        seq_len=32,
        batch=8,
        init_from="",
        eval_examples=16,
    )
    config.tokenizer.path = tokenizer
    config.train.steps = 6
    config.train.log_every = 1
    config.eval.every = 1
    config.checkpoint.every = 6
    config.checkpoint.keep = 1
    config.checkpoint.best_metric = "accuracy"
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def _validation_by_step(workdir: str) -> dict[int, dict]:
    with open(os.path.join(workdir, workdir_lib.METRICS)) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "validation/loss" in r}


def _steps_on_disk(workdir: str) -> list[int]:
    folder = os.path.join(workdir, workdir_lib.CHECKPOINTS)
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


@pytest.fixture(scope="module")
def early_stopped(tmp_path_factory):
    """An uninterrupted run with patience 2: best at step 2, stops at step 4."""
    workdir = str(tmp_path_factory.mktemp("early"))
    config = _config(train__steps=10, train__early_stop_patience=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run, "_validate", _scripted)
        summary = run.train_and_evaluate(config, workdir)
    return workdir, summary


def test_best_checkpoint_is_kept_and_scored(early_stopped, tmp_path):
    tokenizer = early_stopped[0]
    workdir = str(tmp_path / "best")
    summary = run.train_and_evaluate(_config(tokenizer), workdir)
    assert summary["step"] == 6 and "early_stopped" not in summary
    assert (summary["best_step"], summary["best_metric"], summary["best_value"]) == (
        2,
        "accuracy",
        0.5,
    )
    assert _steps_on_disk(workdir) == [2, 6]  # keep=1 plus the protected best.
    logged = _validation_by_step(workdir)
    # Task metrics at every evaluation, in metrics.jsonl (macro_f1 is not scripted).
    assert all("validation/macro_f1" in logged[s] for s in range(0, 7))
    # The final validation scores are the step-2 state's, not the last one's.
    assert summary["validation/loss"] == pytest.approx(logged[2]["validation/loss"], rel=1e-6)
    assert summary["validation/loss"] != pytest.approx(logged[6]["validation/loss"], rel=1e-6)
    # Scoring checkpoint 2 directly: a workdir holding only it, resumed at its own last step.
    direct = str(tmp_path / "direct")
    os.makedirs(os.path.join(direct, workdir_lib.CHECKPOINTS))
    shutil.copytree(
        os.path.join(workdir, workdir_lib.CHECKPOINTS, "2"),
        os.path.join(direct, workdir_lib.CHECKPOINTS, "2"),
    )
    plain = _config(tokenizer, train__steps=2, checkpoint__best_metric="")
    scored = run.train_and_evaluate(plain, direct)
    for key in ("test/loss", "test/accuracy", "test/macro_f1", "validation/accuracy"):
        assert summary[key] == pytest.approx(scored[key], rel=1e-6), key


def test_early_stop_at_best_plus_patience(early_stopped):
    workdir, summary = early_stopped
    assert summary["step"] == 4 and summary["early_stopped"] is True
    assert (summary["best_step"], summary["best_value"]) == (2, 0.5)
    assert max(_validation_by_step(workdir)) == 4  # No evaluation after the stop.
    assert _steps_on_disk(workdir) == [2, 4]
    assert workdir_lib.run_finished(workdir, 10)


def test_resume_decides_as_the_uninterrupted_run(early_stopped, tmp_path):
    tokenizer, straight = early_stopped
    workdir = str(tmp_path / "resumed")
    config = _config(tokenizer, train__steps=10, train__early_stop_patience=2)
    config.train.stop_after = 3  # A session that ends between the best and the stop.
    assert run.train_and_evaluate(config, workdir) == {"step": 3}
    config.train.stop_after = 0
    resumed = run.train_and_evaluate(config, workdir)
    again = run.train_and_evaluate(config, workdir)  # After the early stop: trains nothing.
    for summary in (resumed, again):
        for key in ("step", "best_step", "best_value", "early_stopped", "test/loss"):
            assert summary[key] == pytest.approx(straight[key], rel=1e-6), key
    assert max(_validation_by_step(workdir)) == 4


def test_selector_rules_and_record():
    s = selection.Selector("loss", patience=2)
    assert s.observe(1, {"loss": 2.0}) and s.best_step == 1
    assert not s.observe(2, {"loss": 2.0})  # Equal is no improvement.
    assert s.observe(3, {"loss": 3.0}) and s.early_stopped  # Second evaluation without.
    back = selection.Selector.from_config(
        ml_collections.ConfigDict({"best_metric": "loss"}),
        ml_collections.ConfigDict({"early_stop_patience": 2}),
        json.loads(json.dumps(s.as_record())),
    )
    assert back == s
    up = selection.Selector("rouge_l")
    assert up.observe(1, {"rouge_l": 3.0}) and not up.observe(2, {"rouge_l": 2.0})
    assert up.observe(3, {"rouge_l": 4.0}) and up.kept() == {3}
    with pytest.raises(KilnError, match="checkpoint.best_metric"):
        up.observe(4, {"loss": 1.0})  # Not scored at evaluations: said so.
    cfg = _config()
    cfg.checkpoint.best_metric = "rouge_x"
    with pytest.raises(KilnError, match="checkpoint.best_metric"):
        validation.validate(cfg, 1)
    cfg.checkpoint.best_metric = ""
    cfg.train.early_stop_patience = 3
    with pytest.raises(KilnError, match="train.early_stop_patience"):
        validation.validate(cfg, 1)
    cfg.train.early_stop_patience = 0
    cfg.eval.task_metrics = "sometimes"
    with pytest.raises(KilnError, match="eval.task_metrics"):
        validation.validate(cfg, 1)
    when = {m: ml_collections.ConfigDict({"task_metrics": m}) for m in selection.MODES}
    assert [selection.task_metrics_at(when[m], 0, head=False) for m in selection.MODES] == [
        False,
        True,
        False,
    ]
    assert selection.task_metrics_at(when["auto"], 0, head=True)
    assert selection.task_metrics_at(when["auto"], 5, head=False)
    assert not selection.task_metrics_at(when["end"], 5, head=True)


def test_protected_steps_outlive_keep(tmp_path):
    import jax.numpy as jnp

    from kiln import checkpoint

    state = {"params": {"w": jnp.ones((2,))}, "step": jnp.asarray(0)}
    ckpt = checkpoint.Checkpointer(tmp_path, keep=1, keep_every=4, async_save=False)
    for step in range(1, 7):
        if step == 2:
            ckpt.protect({2})
        ckpt.save(step, state)
    assert sorted(ckpt.all_steps()) == [2, 4, 6]  # Protected, every 4th, the latest.
    ckpt.protect(set())  # A newer best: the old one may go.
    ckpt.save(7, state)
    assert sorted(ckpt.all_steps()) == [4, 7]
    ckpt.close()


def test_generation_task_metrics_at_evaluations_pick_the_best(early_stopped, tmp_path):
    """eval.task_metrics=auto decodes the validation examples at every evaluation after step 0
    (logged like the loss); checkpoint.best_metric=chrf keeps and scores the best of them."""
    config = _config(early_stopped[0], "gpt", train__steps=3, checkpoint__best_metric="chrf")
    config.task.name, config.task.target_len, config.task.eval_examples = "kjv2web", 8, 8
    config.optim.lr = 3e-3
    workdir = str(tmp_path / "gen")
    summary = run.train_and_evaluate(config, workdir)
    logged = _validation_by_step(workdir)
    assert "validation/chrf" not in logged[0]
    chrf = {s: logged[s]["validation/chrf"] for s in (1, 2, 3)}
    best = max(chrf, key=lambda s: (chrf[s], -s))  # The first of equal values.
    assert (summary["best_step"], summary["best_value"]) == (best, chrf[best])
    assert summary["validation/chrf"] == pytest.approx(chrf[best], rel=1e-9)
    assert best in _steps_on_disk(workdir)
