"""Seed replicates (kiln.seeds): mean and sample std against numpy, grouping of sweep points and
pipeline stages, the pipeline comparison and kiln.tools.report over seeds, and a tiny 2-seed
pipeline end to end."""

import json
import math

import numpy as np
import pytest

from kiln import arms, config_lib, pipelines, seeds
from kiln.tools import report

VALUES = [0.523, 0.522, 0.518]


def test_stat_matches_numpy():
    s = seeds.stat(VALUES)
    assert s.n == 3
    assert s.mean == pytest.approx(np.mean(VALUES), rel=1e-12)
    assert s.std == pytest.approx(np.std(VALUES, ddof=1), rel=1e-12)
    assert seeds.stat([0.4]) == seeds.Stat(0.4, None, 1)
    assert seeds.Stat(0.52100, 0.00264575, 3).text() == "0.521 ± 0.0026"
    with pytest.raises(ValueError):
        seeds.stat([])


def test_aggregate_skips_what_is_not_a_finite_number():
    stats = seeds.aggregate(
        [
            {"test/accuracy": 0.5, "test/f1": 0.1, "task": "x", "early_stopped": True},
            {"test/accuracy": 0.7, "test/f1": math.nan},
            {"test/accuracy": 0.9},
        ]
    )
    assert set(stats) == {"test/accuracy", "test/f1"}
    assert stats["test/accuracy"].std == pytest.approx(np.std([0.5, 0.7, 0.9], ddof=1))
    assert stats["test/f1"] == seeds.Stat(0.1, None, 1)


def test_group_sweep_points_and_pipeline_stages():
    sweep = seeds.group(
        [
            ("lr=0.001_seed=0", {"optim.lr": 1e-3, "seed": 0}),
            ("lr=0.003_seed=0", {"optim.lr": 3e-3, "seed": 0}),
            ("lr=0.001_seed=1", {"optim.lr": 1e-3, "seed": 1}),
        ]
    )
    assert [(g.name, g.members, g.seeds) for g in sweep] == [
        ("optim.lr=0.001", ["lr=0.001_seed=0", "lr=0.001_seed=1"], [0, 1]),
        ("optim.lr=0.003", ["lr=0.003_seed=0"], [0]),
    ]
    stages = seeds.group(
        (n, {}) for n in ("pretrain", "finetune_lr1e-3_seed0", "finetune_lr1e-3_seed1")
    )
    assert [(g.name, g.seeds) for g in stages] == [
        ("pretrain", [None]),
        ("finetune_lr1e-3", [0, 1]),
    ]
    assert seeds.has_replicates(stages) and not seeds.has_replicates(stages[:1])


def _row(val: float, test: float) -> dict:
    metrics = {"validation/accuracy": val, "test/accuracy": test}
    return {"task": "t", "init_from": "pretrain", "steps": 2, "metrics": metrics}


def test_comparison_chooses_an_arm_on_its_mean_over_seeds():
    rows = {
        "finetune_lr1e-3_seed0": _row(0.50, 0.40),
        "finetune_lr1e-3_seed1": _row(0.60, 0.50),
        "finetune_lr3e-3_seed0": _row(0.70, 0.45),  # Best single stage, worse mean (0.5).
        "finetune_lr3e-3_seed1": _row(0.30, 0.20),
        "scratch": _row(0.40, 0.30),
    }
    arms = pipelines._choose_arms(rows, "accuracy")
    chosen = arms["finetune"]
    assert chosen["stage"] == "finetune_lr1e-3" and chosen["n"] == 2
    assert chosen["stages"] == ["finetune_lr1e-3_seed0", "finetune_lr1e-3_seed1"]
    assert chosen["metrics"]["test/accuracy"] == pytest.approx(0.45)
    assert chosen["std"]["test/accuracy"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert arms["scratch"] == {"stage": "scratch", "metrics": rows["scratch"]["metrics"]}
    table = {"select": "accuracy", "stages": rows, "arms": arms}
    table["verdict"] = pipelines.verdict(table, "")
    text = pipelines.markdown(table)
    assert "finetune arm -> stage finetune_lr1e-3 (mean ± sample std over 2 seeds)" in text
    assert f"accuracy 0.45 ± {np.std([0.4, 0.5], ddof=1):.2g}" in text
    assert "| finetune_lr3e-3 | 2 | 0.325 ± 0.18 |" in text  # The over-seeds table.
    assert "means over 2 and 1 seeds" in table["verdict"]


def test_report_of_a_sweep_with_seeds(tmp_path):
    points = []
    for lr, seed, acc in ((1e-3, 0, 0.5), (1e-3, 1, 0.6), (1e-3, 2, 0.8), (3e-3, 0, 0.4)):
        name = f"lr={lr!r}_seed={seed}"
        points.append({"name": name, "overrides": {"optim.lr": lr, "seed": seed}})
        (tmp_path / name).mkdir()
        summary = {"step": 2, "task": "t", "validation/accuracy": acc, "test/accuracy": acc - 0.1}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "sweep.json").write_text(json.dumps({"config": "x.py", "points": points}))
    _, _, markdown = report.write_report(str(tmp_path))
    section = markdown[markdown.index("## Over seeds") :]
    val = [0.5, 0.6, 0.8]  # validation/accuracy, the first column.
    assert f"| optim.lr=0.001 | 3 | {np.mean(val):.4g} ± {np.std(val, ddof=1):.2g} |" in section
    assert "| optim.lr=0.003 | 1 |" in section
    assert "## Over seeds" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_two_seed_pipeline_end_to_end(tmp_path):
    pretrain = config_lib.load_config("experiments/bert/pretrain.py:size=micro")
    pretrain.train.steps = pretrain.checkpoint.every = 2
    built = arms.finetune_arms(
        pretrain,
        (1e-3,),
        seeds=(0, 1),
        task="wn_lexname",
        train_examples=16,
        epochs=1,
        seq_len=32,
        batch=8,
        eval_examples=16,
    )
    assert set(built) == {"finetune_seed0", "finetune_seed1", "scratch_seed0", "scratch_seed1"}
    assert [built[f"finetune_seed{s}"].seed for s in (0, 1)] == [0, 1]
    stages = {"pretrain": pretrain, "finetune_seed0": built["finetune_seed0"]}
    stages["finetune_seed1"] = built["finetune_seed1"]
    table = pipelines.run_pipeline(arms.pipeline(stages, select="accuracy"), str(tmp_path))
    chosen = table["arms"]["finetune"]
    assert chosen["n"] == 2 and chosen["stage"] == "finetune"
    got = [table["stages"][f"finetune_seed{s}"]["metrics"]["test/loss"] for s in (0, 1)]
    assert got[0] != got[1]  # The seeds differ.
    assert chosen["metrics"]["test/loss"] == pytest.approx(np.mean(got), rel=1e-12)
    assert chosen["std"]["test/loss"] == pytest.approx(np.std(got, ddof=1), rel=1e-9)
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert saved["arms"]["finetune"]["std"] == chosen["std"]
    assert "| finetune | 2 |" in (tmp_path / "comparison.md").read_text()
