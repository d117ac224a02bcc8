"""`kiln.tools.evaluate` end to end on tiny runs: prompting a pre-trained gpt and t5, a
fine-tuned head answering its task, and a pipeline with a `fewshot` arm."""

import json
import shutil

import pytest

from kiln import arms, config_lib, pipelines, run
from kiln.errors import KilnError
from kiln.tools import evaluate

pytestmark = pytest.mark.slow


def _pretrain_config(family: str):
    config = config_lib.load_config(f"experiments/{family}/pretrain.py:size=micro")
    config.model.max_len = 128  # Room for a demonstration in the prompt.
    config.train.steps = 2
    config.checkpoint.every = 2
    return config


@pytest.fixture(scope="module", params=["gpt", "t5"])
def pretrained(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"{request.param}_pretrain")
    config = _pretrain_config(request.param)
    run.train_and_evaluate(config, str(workdir))
    return workdir, config


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_cli_prompts_a_pretrained_model_by_rank_and_by_generation(pretrained, tmp_path, capsys):
    workdir, _ = pretrained
    out = tmp_path / "rank.jsonl"
    argv = ["--workdir", str(workdir), "--task", "wn_lexname", "--examples", "4"]
    assert evaluate.main([*argv, "--shots", "1", "--scoring", "rank", "--out", str(out)]) == 0
    rows = _rows(out)
    assert len(rows) == 4 and all(r["shots"] == 1 and not r["cut"] for r in rows)
    assert all(r["prediction"] == max(r["scores"], key=r["scores"].get) for r in rows)
    accuracy = sum(r["prediction"] == r["target"] for r in rows) / 4
    printed = capsys.readouterr().out
    assert "prompting (1-shot, rank)" in printed
    assert json.loads(printed.splitlines()[-1])["metrics"]["accuracy"] == accuracy
    # Generation with the task metric, on a shipped generation task and on a JSONL file.
    gen = ["--scoring", "generate", "--max-new-tokens", "4", "--examples", "2"]
    assert evaluate.main(["--workdir", str(workdir), "--task", "kjv2web", *gen]) == 0
    assert "chrf" in json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    assert len(_rows(workdir / "evaluation_kjv2web_test.jsonl")) == 2
    data = tmp_path / "mine.jsonl"
    lines = [
        {"input": f"word {i}", "target": f"w{i}", "split": s}
        for i, s in enumerate(["train"] * 3 + ["validation"] + ["test"] * 2)
    ]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert (
        evaluate.main(["--workdir", str(workdir), "--task", str(data), "--shots", "2", *gen]) == 0
    )
    assert [r["id"] for r in _rows(workdir / "evaluation_mine_test.jsonl")] != []


def test_cli_errors_are_one_paragraph(pretrained, capsys):
    workdir, _ = pretrained
    base = ["--workdir", str(workdir)]
    assert evaluate.main([*base, "--task", "nope"]) == 2
    assert "Unknown task 'nope'" in capsys.readouterr().err
    assert evaluate.main([*base, "--task", "wn_lexname", "--shots", "-1"]) == 2
    assert "shots=-1 must be >= 0" in capsys.readouterr().err
    assert evaluate.main([*base, "--task", "kjv2web", "--scoring", "rank"]) == 2
    assert "ranks label words" in capsys.readouterr().err
    assert evaluate.main(["--workdir", str(workdir / "missing"), "--task", "kjv2web"]) == 2


@pytest.mark.parametrize("pretrained", ["gpt"], indirect=True)  # t5 answers in text, no head
def test_a_fine_tuned_head_answers_its_task_as_its_run_did(pretrained, tmp_path, capsys):
    workdir, pretrain = pretrained
    config = arms.finetune_stage(
        pretrain,
        task="wn_lexname",
        train_examples=16,
        epochs=1.0,
        lr=1e-3,
        seq_len=32,
        batch=8,
        init_from=str(workdir),
        eval_examples=8,
    )
    config.tokenizer.path = str(workdir)
    ft = tmp_path / "ft"
    summary = run.train_and_evaluate(config, str(ft))
    argv = ["--workdir", str(ft), "--task", "wn_lexname", "--examples", "8"]
    assert evaluate.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
    assert printed["accuracy"] == pytest.approx(summary["test/accuracy"])
    got = [r["prediction"] for r in _rows(ft / "evaluation_wn_lexname_test.jsonl")]
    assert got == [r["prediction"] for r in _rows(ft / "predictions_test.jsonl")]
    assert evaluate.main([*argv, "--shots", "1"]) == 2
    assert "answers 'wn_lexname' with its head" in capsys.readouterr().err
    assert evaluate.main([*argv[:3], "bible_genre"]) == 2
    # Evaluation only: the fine-tune config with train.steps=0 restores the head it trained.
    again = config_lib.load_config(
        f"experiments/finetune.py:from={ft},task=wn_lexname,seq_len=32,batch=8"
    )
    again.train.steps, again.task.eval_examples = 0, 8
    scored = run.train_and_evaluate(again, str(tmp_path / "eval_only"))
    assert scored["step"] == 0 and scored["task"] == "wn_lexname"
    assert {"validation/loss", "test/loss", "validation/accuracy"} <= set(scored)
    for key in ("validation/accuracy", "test/accuracy", "test/macro_f1", "test/loss"):
        assert scored[key] == pytest.approx(summary[key], rel=1e-5), key
    got = [r["prediction"] for r in _rows(tmp_path / "eval_only" / "predictions_test.jsonl")]
    assert got == [r["prediction"] for r in _rows(ft / "predictions_test.jsonl")]


@pytest.mark.parametrize("pretrained", ["gpt"], indirect=True)  # one family is enough here
def test_pipeline_with_a_fewshot_arm_compares_prompting(pretrained, tmp_path):
    workdir, pretrain = pretrained
    shutil.copytree(workdir, tmp_path / "pretrain")  # A finished stage: skipped.
    stages = {
        "pretrain": pretrain,
        "fewshot": arms.fewshot_stage(
            pretrain, task="wn_lexname", shots=1, scoring="rank", eval_examples=4
        ),
    }
    config = arms.pipeline(stages, select="accuracy")
    table = pipelines.run_pipeline(config, str(tmp_path))
    row = table["stages"]["fewshot"]
    assert row["steps"] == 0 and row["init_from"] == "pretrain, prompting (1-shot, rank)"
    assert 0 <= row["metrics"]["test/accuracy"] <= 1 and table["arms"]["fewshot"]
    text = (tmp_path / "comparison.md").read_text()
    assert "| fewshot | pretrain, prompting (1-shot, rank) | 0 |" in text
    assert len(_rows(tmp_path / "fewshot" / "predictions_test.jsonl")) == 4
    again = pipelines.run_pipeline(config, str(tmp_path))  # Finished: skipped, same table.
    assert again["stages"]["fewshot"] == row


@pytest.mark.parametrize("pretrained", ["gpt"], indirect=True)
def test_a_fewshot_config_runs_alone_and_scores_as_the_cli(pretrained, tmp_path, capsys):
    workdir, pretrain = pretrained
    config = arms.fewshot_stage(
        pretrain, task="wn_lexname", shots=1, scoring="rank", eval_examples=4,
        init_from=str(workdir),
    )  # fmt: skip
    summary = run.train_and_evaluate(config, str(tmp_path / "fewshot"))
    assert summary["step"] == 0 and summary["method"] == "prompting (1-shot, rank)"
    for split in ("validation", "test"):
        argv = ["--workdir", str(workdir), "--task", "wn_lexname", "--split", split]
        argv += ["--examples", "4", "--shots", "1", "--scoring", "rank"]
        assert evaluate.main([*argv, "--out", str(tmp_path / f"{split}.jsonl")]) == 0
        printed = json.loads(capsys.readouterr().out.splitlines()[-1])["metrics"]
        assert printed == {k: summary[f"{split}/{k}"] for k in printed}
    config.train.steps = 3  # A prompting config trains nothing.
    with pytest.raises(KilnError, match="train.steps=3"):
        run.train_and_evaluate(config, str(tmp_path / "bad"))
