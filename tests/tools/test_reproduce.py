"""`kiln.tools.reproduce`: a micro study end to end, its skipping of finished cells, its errors."""

import json
import os
import pathlib
import shutil

import pytest

from kiln.tools import reproduce, reproduction_doc, study

ROOT = pathlib.Path(__file__).parents[2]


def _study(tmp_path: pathlib.Path, *extra: str) -> int:
    return reproduce.main(
        [
            "--size=micro",
            "--pipelines=bert_wn_lexname",
            "--labels=40",
            "--seeds=0",
            f"--workdir={tmp_path / 'runs'}",
            f"--results={tmp_path / 'study.json'}",
            f"--experiments={ROOT / 'experiments/pipelines'}",
            *extra,
        ]
    )


def _summary(path: pathlib.Path) -> dict:
    return json.loads((path / "summary.json").read_text())


@pytest.mark.slow
def test_micro_study_records_what_the_runs_measured_and_skips_finished_cells(tmp_path, capsys):
    assert _study(tmp_path) == 0
    results = json.loads((tmp_path / "study.json").read_text())
    entry = results["pipelines"]["bert_wn_lexname"]
    assert (entry["task"], entry["metric"], entry["labels"]) == ("wn_lexname", "accuracy", [40])
    # The arms' numbers are the chosen stages' summaries, read here independently.
    cell = tmp_path / "runs/bert_wn_lexname/seed0/n40"
    runs = {r["arm"]: r for r in entry["runs"]}
    assert set(runs) == {"finetune", "scratch"}
    for row in runs.values():
        summary = _summary(cell / row["stage"])
        assert summary["task"] == "wn_lexname" and summary["step"] > 0
        assert row["test"] == summary["test/accuracy"]
        assert row["validation"] == summary["validation/accuracy"]
        assert row["labels"] == 40 and row["seed"] == 0
    # Both arms fine-tune from the seed's one pre-training run (or from nothing).
    pretrain_dir = str(tmp_path / "runs/bert_wn_lexname/seed0/pretrain")
    config = json.loads((cell / runs["finetune"]["stage"] / "config.json").read_text())
    assert config["init_from"]["workdir"] == pretrain_dir
    assert json.loads((cell / runs["scratch"]["stage"] / "config.json").read_text())["init_from"][
        "workdir"
    ] in ("", None)
    # The pre-training curve ends at the run's last logged training loss.
    rows = [json.loads(line) for line in open(os.path.join(pretrain_dir, "metrics.jsonl"))]
    last = [r for r in rows if "train/loss" in r][-1]
    (curve,) = entry["pretrain"]
    assert (curve["steps"][-1], curve["loss"][-1]) == (last["step"], last["train/loss"])
    assert curve["steps"] == sorted(curve["steps"])
    # Baselines on the same 40 labeled examples; the document is rendered from the JSON.
    assert {(b["name"], b["labels"]) for b in entry["baselines"]} == {
        ("majority", 40),
        ("tfidf_svm", 40),
    }
    assert (tmp_path / "study.md").read_text() == reproduction_doc.render(results)

    # A re-run skips the finished cell: with its runs deleted, nothing is run again.
    shutil.rmtree(tmp_path / "runs")
    assert _study(tmp_path) == 0
    assert not (tmp_path / "runs").exists()
    again = json.loads((tmp_path / "study.json").read_text())
    assert again["pipelines"] == results["pipelines"]


def test_bad_grids_are_refused_with_the_flag_named(tmp_path, capsys):
    assert _study(tmp_path, "--labels=0") == 2
    assert "--labels='0'" in capsys.readouterr().err
    assert _study(tmp_path, "--pipelines=bert_squad") == 2
    assert "choose from bert_wn_lexname" in capsys.readouterr().err
    assert _study(tmp_path, "--seeds=0,0") == 2
    assert "distinct seeds" in capsys.readouterr().err
    (tmp_path / "study.json").write_text(json.dumps({"size": "cpu", "pipelines": {}}))
    assert _study(tmp_path) == 2
    assert "size='cpu', not 'micro'" in capsys.readouterr().err


def test_labels_all_is_the_shipped_train_split():
    from kiln.data import tasks

    for name, size in tasks.TRAIN_SIZES.items():
        assert len(tasks.load_task(name).splits["train"]) == size, name


def test_pretrain_curve_of_a_resumed_run_keeps_each_steps_last_value(tmp_path):
    # A run killed at step 30 and resumed from its step-20 checkpoint logs steps 30 and 40 again.
    logged = [(10, 5.0), (20, 4.0), (30, 3.9), (40, 3.8), (30, 3.5), (40, 3.4), (50, 3.3)]
    lines = [{"step": s, "train/loss": v} for s, v in logged]
    lines.insert(2, {"step": 20, "validation/loss": 4.2})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve = study.pretrain_curve(str(tmp_path))
    assert curve["steps"] == [10, 20, 30, 40, 50]
    assert curve["loss"] == [5.0, 4.0, 3.5, 3.4, 3.3]
    assert (curve["validation_steps"], curve["validation_loss"]) == ([20], [4.2])
