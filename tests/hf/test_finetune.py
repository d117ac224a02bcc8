"""`python -m kiln.main` fine-tunes imported HF checkpoints on a shipped task through a pipeline:
from the kiln import (init_from.workdir) and straight from the HF directory (init_from.hf),
which must be the same run, next to a from-scratch arm of the same architecture."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from kiln.tools import convert

REPO = pathlib.Path(__file__).resolve().parents[2]

_PIPELINE = '''
"""Fine-tune an imported checkpoint (init_from.workdir), the same straight from its HF
directory (init_from.hf), and the architecture from scratch: tiny wn_lexname runs."""

from kiln import arms, config_lib, defaults
from kiln.hf import checkpoints

IMPORTED, HF = {imported!r}, {hf!r}


def _stage(pretrain, workdir="", hf=""):  # The tokenizer comes from the source.
    c = arms.finetune_stage(
        pretrain, task="wn_lexname", train_examples=40, epochs=0.4, lr=1e-3, seq_len=32,
        batch=8, init_from=workdir,
    )
    c.init_from.hf = hf
    c.tokenizer.path = "" if (workdir or hf) else IMPORTED
    c.data.data_dir = "data/tiny"
    c.task.eval_examples = 16
    c.eval.batches = 1
    return c


def get_config(arg=None):
    pretrain = config_lib.load_json(IMPORTED + "/config.json")
    stages = {{
        "finetune": _stage(pretrain, workdir=IMPORTED),
        "hf": _stage(checkpoints.kiln_config(HF), hf=HF),
        "scratch": _stage(pretrain),
    }}
    return arms.pipeline(stages, select="accuracy")
'''


@pytest.mark.slow
@pytest.mark.parametrize("source,model_type", [("gpt2_dir", "gpt2"), ("bert_dir", "bert")])
def test_finetune_of_an_imported_checkpoint_through_main(source, model_type, request, tmp_path):
    hf_dir = request.getfixturevalue(source)
    imported, workdir = str(tmp_path / model_type), tmp_path / "runs"
    assert convert.main(["--from-hf", hf_dir, "--out", imported]) == 0
    config = tmp_path / "pipeline.py"
    config.write_text(_PIPELINE.format(imported=imported, hf=hf_dir))
    cmd = [sys.executable, "-m", "kiln.main", f"--config={config}", f"--workdir={workdir}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"init_from {imported} step 0: " in result.stdout
    assert f"Restore: imported {hf_dir} (HF model_type '{model_type}')" in result.stdout
    stages = json.loads((workdir / "comparison.json").read_text())["stages"]
    metrics = {name: stage["metrics"] for name, stage in stages.items()}
    assert 0.0 <= metrics["finetune"]["test/accuracy"] <= 1.0
    assert metrics["hf"] == metrics["finetune"]  # The same parameters, tokenizer and data.
    assert metrics["scratch"] != metrics["finetune"]  # Fresh parameters: another run.
    table = (workdir / "comparison.md").read_text()
    assert f"| finetune | {model_type} |" in table
    assert f"| hf | {os.path.basename(hf_dir)} |" in table
