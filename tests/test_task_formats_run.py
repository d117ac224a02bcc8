"""End-to-end fine-tunes at tiny size on the user-file formats: sentence pairs and regression."""

import json
import random

import numpy as np
import pytest

from kiln import arms, config_lib, run

pytestmark = pytest.mark.slow
_WORDS = "river stone light city train model north south old new bright quiet".split()


def _pretrain(family: str, workdir: str, max_len: int = 32):
    config = config_lib.load_config(f"experiments/{family}/pretrain.py:size=micro")
    config.model.max_len = max_len
    config.train.steps = config.checkpoint.every = 1
    run.train_and_evaluate(config, workdir)
    return config


def _write(path, regression: bool, pairs: bool) -> str:
    rng = random.Random(0)
    lines = []
    for i in range(120):
        a, b = " ".join(rng.choices(_WORDS, k=4)), " ".join(rng.choices(_WORDS, k=3))
        same = len(set(a.split()) & set(b.split()))
        record = {"id": f"x{i}", "s1": a, "score": float(same) if regression else str(same > 0)}
        if pairs:
            record["s2"] = b
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _finetune(pretrain, source: str, path: str, metrics: str = ""):
    config = arms.finetune_stage(
        pretrain, task="jsonl", train_examples=0, epochs=0.2, lr=1e-3, seq_len=32, batch=8,
        init_from=source,
    )  # fmt: skip
    config.tokenizer.path = source
    config.task.path = path
    config.task.fields = "text=s1,text_pair=s2,label=score"
    config.task.metrics = metrics
    return config


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_sentence_pairs_and_regression_end_to_end(family, tmp_path):
    source = str(tmp_path / "pretrain")
    pretrain = _pretrain(family, source)
    pairs = _write(tmp_path / "pairs.jsonl", regression=False, pairs=True)
    config = _finetune(pretrain, source, pairs, "accuracy,binary_f1,matthews_corr")
    summary = run.train_and_evaluate(config, str(tmp_path / "pairs"))
    assert summary["step"] == config.train.steps > 0
    for split in ("validation", "test"):
        assert 0.0 <= summary[f"{split}/accuracy"] <= 1.0
        assert 0.0 <= summary[f"{split}/binary_f1"] <= 1.0
        assert -1.0 <= summary[f"{split}/matthews_corr"] <= 1.0
        assert f"{split}/macro_f1" not in summary  # task.metrics chose the metrics.
    rows = [json.loads(x) for x in open(tmp_path / "pairs" / "predictions_test.jsonl")]
    assert rows and all(r["prediction"] in ("False", "True") for r in rows)

    values = _write(tmp_path / "values.jsonl", regression=True, pairs=family == "bert")
    config = _finetune(pretrain, source, values)
    summary = run.train_and_evaluate(config, str(tmp_path / "values"))
    for split in ("validation", "test"):
        assert -1.0 <= summary[f"{split}/pearson"] <= 1.0
        assert -1.0 <= summary[f"{split}/spearman"] <= 1.0
        assert summary[f"{split}/mse"] >= 0.0 and np.isfinite(summary[f"{split}/loss"])
    rows = [json.loads(x) for x in open(tmp_path / "values" / "predictions_test.jsonl")]
    assert rows and all(isinstance(r["prediction"], float) for r in rows)
    # The validation loss is the mean squared error of the head's values.
    assert summary["validation/loss"] == pytest.approx(summary["validation/mse"], rel=1e-4)
