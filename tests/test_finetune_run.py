"""Fine-tuning runs in-process: init_from loading, restore order, mismatches, pipelines."""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from kiln import (
    arms,
    checkpoint,
    config_lib,
    finetuning,
    models,
    optim,
    pipelines,
    restore,
    run,
    sharding,
    train,
)
from kiln.data import tasks
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.tools import convert, sample

pytestmark = pytest.mark.slow


def _pretrain_config(family: str = "bert", steps: int = 2):
    config = config_lib.load_config(f"experiments/{family}/pretrain.py:size=micro")
    config.train.steps = steps
    config.checkpoint.every = steps
    return config


def _finetune_config(pretrain, source: str, **fields):
    config = arms.finetune_stage(
        pretrain,
        task="wn_lexname",
        train_examples=40,
        epochs=0.4,  # 2 steps of 8
        lr=1e-3,
        seq_len=32,
        batch=8,
        init_from=source,
    )
    config.tokenizer.path = source
    config.task.eval_examples = 16
    for dotted, value in fields.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.fixture(scope="module")
def bert_source(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("bert_pretrain"))
    config = _pretrain_config()
    run.train_and_evaluate(config, workdir)
    return workdir, config


def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def _flat(tree):
    return {
        "/".join(_key(k) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def test_init_from_loads_the_body_exactly_and_heads_fresh_on_another_mesh(bert_source):
    workdir, pretrain = bert_source
    config = _finetune_config(pretrain, workdir)
    source = restore.resolve(config.init_from)
    assert source.step == 2
    restore.check_architecture(config.model, source)
    model = models.build_model(config.model, num_classes=45)
    optimizer = train.optax.adamw(1e-3)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    mesh = sharding.make_mesh(config.mesh)
    _, shardings = train.state_shardings(model, optimizer, mesh, 32)
    with sharding.activation_rules(mesh):
        fresh = jax.jit(
            lambda: train.init_state(model, optimizer, 0, 32), out_shardings=shardings
        )()
    loaded, fresh_paths, unused = restore.plan(source, fresh.params, skip="")
    assert sorted(fresh_paths) == sorted(
        p for p in _flat(fresh.params) if p.startswith(("pooler", "classifier"))
    )
    assert unused and all(p.startswith("mlm_head") for p in unused)
    params = restore.load_params(source, fresh.params, loaded)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = _flat(ckpt.restore_raw(2)["params"])
    ckpt.close()
    got, initial = _flat(params), _flat(fresh.params)
    for path in loaded:
        np.testing.assert_array_equal(got[path], saved[path], err_msg=path)
    for path in fresh_paths:
        np.testing.assert_array_equal(got[path], initial[path], err_msg=path)
    # Placed on the fine-tune's mesh: the embedding is sharded as its logical names say.
    embedding = jax.tree_util.tree_leaves(params["token_embed"])[0]
    assert embedding.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
    # `skip` re-initialises matching body parameters too.
    loaded2, fresh2, _ = restore.plan(source, fresh.params, skip="block_1/.*")
    assert any(p.startswith("block_1/") for p in fresh2)
    assert not any(p.startswith("block_1/") for p in loaded2)


def test_mismatches_and_bad_sources_fail_clearly(bert_source, tmp_path):
    workdir, pretrain = bert_source
    config = _finetune_config(pretrain, workdir)
    config.model.d_ff = 256
    config.model.vocab_size = 1024
    source = restore.resolve(config.init_from)
    with pytest.raises(KilnError, match=r"d_ff: 512 != 256.*vocab_size: 512 != 1024"):
        restore.check_architecture(config.model, source)
    gpt = _pretrain_config("gpt")
    with pytest.raises(KilnError, match="family='bert' run"):
        restore.check_architecture(gpt.model, source)
    config.init_from.workdir = str(tmp_path / "missing")
    with pytest.raises(KilnError, match="no run there"):
        restore.resolve(config.init_from)
    config.init_from.workdir = os.path.join(workdir, "checkpoints", "7")
    with pytest.raises(KilnError, match="steps \\[2\\] only"):
        restore.resolve(config.init_from)


def _log_lines(capsys):
    return capsys.readouterr().out


def test_finetune_starts_at_step_0_and_resumes_its_own_checkpoint(bert_source, tmp_path, capsys):
    workdir, pretrain = bert_source
    target = str(tmp_path / "ft")
    config = _finetune_config(pretrain, workdir, train__stop_after=1, checkpoint__every=1)
    result = run.train_and_evaluate(config, target)
    assert result == {"step": 1}
    out = _log_lines(capsys)
    assert f"init_from {os.path.abspath(workdir)} step 2" in out
    config.train.stop_after = 0
    summary = run.train_and_evaluate(config, target)
    out = _log_lines(capsys)
    assert "resuming from this workdir's checkpoint at step 1" in out
    assert "init_from" not in out.split("Restore:")[1].split("\n")[0]
    assert summary["step"] == 2 and summary["task"] == "wn_lexname"
    assert 0.0 <= summary["test/accuracy"] <= 1.0 and "test/macro_f1" in summary
    rows = [json.loads(line) for line in open(os.path.join(target, "metrics.jsonl"))]
    lr_at_1 = next(r["train/lr"] for r in rows if r["step"] == 1 and "train/lr" in r)
    # The schedule restarts: update 1 of 2 (no warmup at 10% of 2 steps) is halfway down the
    # linear decay, lr * (1 - 1/2); continuing the source's step 2 it would be 0.
    assert lr_at_1 == pytest.approx(1e-3 * 0.5)
    # Uninterrupted, the same fine-tune ends with the same test metrics.
    again = run.train_and_evaluate(config, str(tmp_path / "ft2"))
    for key in ("test/accuracy", "test/macro_f1", "test/loss"):
        assert again[key] == summary[key], key


def _pipeline(**finetune_fields):
    pretrain = _pretrain_config()
    stages = {
        "pretrain": pretrain,
        "finetune": _finetune_config(pretrain, "@pretrain", **finetune_fields),
        "scratch": _finetune_config(pretrain, ""),
    }
    stages["scratch"].tokenizer.path = "@pretrain"
    config = arms.pipeline(stages, select="accuracy")
    config.lock()
    return config


def test_pipeline_resumes_between_and_within_stages(tmp_path):
    straight = pipelines.run_pipeline(_pipeline(), str(tmp_path / "a"))
    split = _pipeline(train__stop_after=1, checkpoint__every=1)
    stopped = pipelines.run_pipeline(split, str(tmp_path / "b"))
    assert stopped == {"step": 1}
    assert not (tmp_path / "b" / "comparison.json").exists()
    split.finetune.train.stop_after = 0
    resumed = pipelines.run_pipeline(split, str(tmp_path / "b"))
    for name in ("pretrain", "finetune", "scratch"):
        assert resumed["stages"][name]["metrics"] == straight["stages"][name]["metrics"], name
    assert set(resumed["arms"]) == {"finetune", "scratch"}
    text = (tmp_path / "b" / "comparison.md").read_text()
    assert "| finetune | pretrain | 2 |" in text and "| scratch | scratch | 2 |" in text
    saved = json.loads((tmp_path / "b" / "comparison.json").read_text())
    assert saved["stages"]["finetune"]["metrics"]["test/accuracy"] == pytest.approx(
        straight["stages"]["finetune"]["metrics"]["test/accuracy"]
    )


def test_bert_classifier_tree_extends_the_pretrained_tree():
    config = _pretrain_config()
    lm = models.build_model(config.model)
    clf = models.build_model(config.model, num_classes=5)

    def paths(model):
        init = lambda: model.init(jax.random.PRNGKey(0), **models.example_inputs(model, 8))  # noqa: E731
        tree = nn.unbox(jax.eval_shape(init)["params"])
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {"/".join(str(k.key) for k in path) for path, _ in leaves}

    lm_paths, clf_paths = paths(lm), paths(clf)
    assert {p for p in lm_paths - clf_paths} == {p for p in lm_paths if p.startswith("mlm_head")}
    assert {p.split("/")[0] for p in clf_paths - lm_paths} == {"pooler", "classifier"}


@pytest.mark.parametrize(
    "family, task, metric",
    [
        ("gpt", "kjv2web", "chrf"),
        ("t5", "wn_lexname", "macro_f1"),
        ("gpt", "bible_genre", "macro_f1"),
    ],
)
def test_finetune_of_each_family_scores_its_task(family, task, metric, tmp_path, capsys):
    source = str(tmp_path / "pretrain")
    pretrain = _pretrain_config(family)
    run.train_and_evaluate(pretrain, source)
    config = _finetune_config(pretrain, source)
    config.task.name = task
    if task == "kjv2web":  # Stacked state: init_from, decoding and checkpoints convert layouts.
        config.model.scan_layers = True
    config.task.target_len = 16
    config.task.eval_examples = 8
    summary = run.train_and_evaluate(config, str(tmp_path / "ft"))
    assert summary["step"] == 2 and summary["test/examples"] == 8
    assert np.isfinite(summary[f"test/{metric}"]) and np.isfinite(summary["test/loss"])
    rows = [json.loads(line) for line in open(tmp_path / "ft" / "predictions_test.jsonl")]
    assert len(rows) == 8 and all(isinstance(r["prediction"], str) for r in rows)
    if task == "kjv2web":  # The copy-the-input baseline is reported next to the model.
        assert 0 < summary["test/copy_input_chrf"] <= 100
    if family == "gpt":
        _check_sample_cli_continues_like_recomputation(source, capsys)
        if task == "kjv2web":  # Once is enough.
            _check_humaneval_cli(source, tmp_path, capsys)
    loaded = finetuning.load(config.task, config.data.data_dir)
    if not finetuning.uses_head(config.model.family, loaded):
        _check_sample_cli_reproduces_predictions(tmp_path, task, rows)


def _check_sample_cli_reproduces_predictions(tmp_path, task: str, rows: list[dict]):
    """`kiln.tools.sample` on the fine-tune's checkpoint, fed the scored test inputs, generates what
    the run's own evaluation predicted (same prompt format and decoding, restored params)."""
    inputs = {e.id: e.input for e in tasks.load_task(task, data_dir="data/tiny").splits["test"]}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": r["id"], "prompt": inputs[r["id"]]}) + "\n" for r in rows)
    )
    out = tmp_path / "generated.jsonl"
    argv = [
        "--workdir",
        str(tmp_path / "ft"),
        "--input-file",
        str(prompts),
        "--output-file",
        str(out),
    ]
    assert sample.main([*argv, "--max-new-tokens", "16"]) == 0
    generated = [json.loads(line) for line in open(out)]
    assert [g["id"] for g in generated] == [r["id"] for r in rows]
    assert [g["generation"].strip() for g in generated] == [r["prediction"] for r in rows]


def _check_sample_cli_continues_like_recomputation(source: str, capsys):
    """Greedy from the CLI equals an argmax loop over full forward passes of the checkpoint."""
    config = config_lib.load_json(os.path.join(source, "config.json"))
    model = models.build_model(config.model)
    ckpt = checkpoint.Checkpointer(os.path.join(source, "checkpoints"))
    params = ckpt.restore_raw(ckpt.latest_step())["params"]
    ckpt.close()
    tok = tokenizer_lib.load_tokenizer(os.path.join(source, "tokenizer.model"))
    ids = [tok.bos_id, *tok.encode("In the beginning")]
    prompt_len = len(ids)
    while len(ids) < prompt_len + 6:
        logits = model.apply({"params": params}, np.array([ids], np.int32))
        ids.append(int(np.argmax(logits[0, -1])))
        if ids[-1] == tok.eos_id:
            ids.pop()
            break
    capsys.readouterr()
    argv = ["--workdir", source, "--prompt", "In the beginning", "--max-new-tokens", "6"]
    assert sample.main(argv) == 0
    assert capsys.readouterr().out == f"--- 0\nIn the beginning{tok.decode(ids[prompt_len:])}\n"
    # --stop-id ends the row at the first occurrence of that id (not printed).
    generated = ids[prompt_len:]
    stop_at = generated.index(generated[-1])
    assert sample.main([*argv, "--stop-id", str(generated[-1])]) == 0
    want = f"--- 0\nIn the beginning{tok.decode(generated[:stop_at])}\n"
    assert capsys.readouterr().out == want


def _check_humaneval_cli(source: str, tmp_path, capsys):
    """`kiln.tools.sample --humaneval` generates for the first problems, runs each program against
    its tests and reports pass@1 as the fraction of programs that passed."""
    out = tmp_path / "humaneval.jsonl"
    argv = ["--workdir", source, "--humaneval", "--problems", "2", "--max-new-tokens", "8"]
    assert sample.main([*argv, "--k", "1", "--output-file", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert all(isinstance(r["completion"], str) and r["status"] for r in rows)
    passed = sum(r["passed"] for r in rows) / len(rows)
    assert f"HumanEval: 2 problems x 1 samples: pass@1 {passed:.4f}" in capsys.readouterr().out


def test_finetune_config_on_user_jsonl_data(bert_source, tmp_path):
    workdir, _ = bert_source
    path = tmp_path / "mine.jsonl"
    words = ["alpha", "beta", "gamma", "delta"]
    with open(path, "w") as f:
        for i in range(200):
            label = "even" if i % 2 == 0 else "odd"
            f.write(json.dumps({"id": f"x{i}", "text": f"{words[i % 4]} item {i}", "label": label}))
            f.write("\n")
    config = config_lib.load_config(
        f"experiments/finetune.py:from={workdir},task=jsonl,path={path},epochs=0.1,batch=8,"
        "seq_len=16"
    )
    assert config.model.to_dict() == config_lib.load_json(f"{workdir}/config.json").model.to_dict()
    summary = run.train_and_evaluate(config, str(tmp_path / "ft"))
    assert summary["task"] == "jsonl" and summary["step"] == config.train.steps
    assert summary["test/examples"] + summary["validation/examples"] > 0
    assert 0.0 <= summary["test/accuracy"] <= 1.0
    assert (tmp_path / "ft" / "tokenizer.model").read_bytes() == (
        open(f"{workdir}/tokenizer.model", "rb").read()
    )


def test_init_from_full_state_continues_pretraining_from_step_0(bert_source, tmp_path, capsys):
    workdir, pretrain = bert_source
    config = _pretrain_config(steps=1)
    config.init_from.workdir = workdir
    config.init_from.load = "state"
    source = restore.resolve(config.init_from)
    model = models.build_model(config.model)
    optimizer = optim.make_optimizer(config.optim, config.train.steps, config.model.n_layers)
    mesh = sharding.make_mesh(config.mesh)
    abstract, shardings = train.state_shardings(model, optimizer, mesh, 32)
    state = restore.load_state(source, checkpoint.abstract_like(abstract, shardings))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    saved = ckpt.restore_raw(2)
    ckpt.close()
    got, want = _flat(state.opt_state), _flat(saved["opt_state"])
    assert got.keys() == want.keys() and len(got) > 2
    for path in got:
        np.testing.assert_array_equal(got[path], want[path], err_msg=path)
    summary = run.train_and_evaluate(config, str(tmp_path / "continued"))
    assert summary["step"] == 1
    assert "full state (parameters and optimizer moments)" in capsys.readouterr().out


def test_sample_cli_errors(bert_source, tmp_path, capsys):
    workdir, _ = bert_source
    cases = [
        (
            ["--workdir", workdir, "--prompt", "x"],
            "is a bert run; kiln.tools.sample generates with decoder (gpt)",
        ),
        (["--workdir", str(tmp_path), "--prompt", "x"], "--workdir='" + str(tmp_path)),
        (["--workdir", workdir, "--prompt", "x", "--prompt", " "], "Prompt 1 is empty"),
        (["--workdir", workdir, "--prompt", "x", "--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--workdir", workdir, "--prompt", "x", "--num-samples", "2"], "needs --strategy sample"),
        (["--workdir", workdir, "--input-file", str(tmp_path / "no.jsonl")], "no such file"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert sample.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("kiln.tools.sample: error: ") and message in err, err
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and the unknown option.
        sample.main(["--workdir", workdir, "--prompt", "x", "--temprature", "0.5"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --temprature" in capsys.readouterr().err


def test_electra_pretraining_reports_detection_and_fine_tunes_from_the_body(tmp_path):
    """An ELECTRA run evaluates its generator and detection losses; a fine-tune loads its body
    exactly (a BERT's names) and leaves the generator and detection head unused."""
    pretrain = config_lib.load_config("experiments/bert/pretrain.py:size=micro,objective=electra")
    pretrain.train.steps = pretrain.checkpoint.every = 2
    source = str(tmp_path / "electra")
    summary = run.train_and_evaluate(pretrain, source)
    for key in ("generator_loss", "detection_loss", "detection_accuracy"):
        assert 0 <= summary[f"validation/{key}"] < 100, key
    # loss = generator's + rtd_weight * (detection sum * mask_rate / selected tokens): about
    # generator + 50 * detection when the selected tokens are mask_rate of the real ones.
    expected = summary["validation/generator_loss"] + 50 * summary["validation/detection_loss"]
    assert summary["validation/loss"] == pytest.approx(expected, rel=0.05)

    config = _finetune_config(pretrain, source)
    built_source = restore.resolve(config.init_from)
    model = models.build_model(config.model, num_classes=45)
    fresh = train.init_params(model, 0)
    loaded, fresh_paths, unused = restore.plan(built_source, fresh, skip=config.init_from.skip)
    assert sorted(fresh_paths) == [
        "classifier/bias",
        "classifier/kernel",
        "pooler/bias",
        "pooler/kernel",
    ]
    assert unused and all(p.startswith(("generator/", "rtd_")) for p in unused)
    result = run.train_and_evaluate(config, str(tmp_path / "ft"))
    assert result["step"] == 2 and 0 <= result["test/accuracy"] <= 1
    # No HF class holds an ELECTRA pre-training run's body without its heads: a clear error.
    with pytest.raises(KilnError, match="objective.name='electra'.*Fine-tune it"):
        convert.export_hf(source, str(tmp_path / "hf"))
