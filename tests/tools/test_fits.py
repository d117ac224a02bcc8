"""kiln.tools.fits: the ahead-of-time memory report of a config's train step."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from kiln import config_lib
from kiln.tools import fits

ROOT = __file__.rsplit("/tests/", 1)[0]


def _config(family="gpt", **mesh):
    config = config_lib.load_config(f"experiments/{family}/pretrain.py:size=tiny")
    config.model.vocab_size = 512
    config.model.max_len = config.data.seq_len = 32
    config.data.global_batch_size = 8
    for axis, size in mesh.items():
        config.mesh[axis] = size
    return config


def test_arguments_are_the_state_and_a_batch_shard_per_device():
    """AdamW in float32 holds params, mu and nu: 12 bytes a parameter, plus this device's rows
    of the batch; sharding the parameters over fsdp=8 divides the state by about 8."""
    config = _config()
    report = fits.memory_report(config)
    batch = fits.synthetic_batch(config, 8, 0)
    batch_bytes = sum(v.nbytes for v in batch.values()) // jax.device_count()
    state_bytes = 12 * report["parameters"]
    assert report["mesh"] == (8, 1, 1)
    assert state_bytes <= report["arguments"] <= state_bytes + batch_bytes + 4096
    assert report["temporaries"] > 0 and report["aliased"] >= state_bytes  # The donated state.
    total = report["arguments"] + report["outputs"] + report["temporaries"] - report["aliased"]
    assert report["estimate"] == total
    sharded = fits.memory_report(_config(data=1, fsdp=8))
    assert sharded["parameters"] == report["parameters"]
    assert sharded["arguments"] < report["arguments"] / 4
    assert np.isclose(sharded["arguments"], state_bytes / 8, rtol=0.25)


def _fits(size: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "kiln.tools.fits",
        "--config",
        f"experiments/gpt/pretrain.py:{size}",
    ]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_prints_the_report():
    result = _fits("size=tiny")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Train step per device" in result.stdout and "estimate" in result.stdout
    bad = _fits("size=huge")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "kiln.tools.fits: error: " in bad.stderr and "size='huge' is unknown" in bad.stderr


def _report_holds_the_state(config) -> dict:
    """memory_report of `config`: compiles, and its arguments hold AdamW's float32 state."""
    report = fits.memory_report(config)
    assert report["arguments"] >= 12 * report["parameters"] > 0
    assert report["estimate"] > 0
    return report


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_prefix_lm(family):
    """Every objective of a family builds its batch through the run's own objective: the
    decoder's prefix LM adds a prefix mask, T5's makes targets as long as the inputs."""
    config = _config(family)
    config.objective.name = "prefix_lm"
    batch = fits.synthetic_batch(config, 8, 0)
    if family == "gpt":
        assert batch["prefix_mask"].shape == batch["inputs"].shape == (8, 32)
    else:
        assert batch["targets"].shape == batch["encoder_inputs"].shape == (8, 32)
    _report_holds_the_state(config)


def test_finetune_config(tmp_path):
    """experiments/finetune.py from a (config-only) pre-training run: the classifier model and
    its batch of one label per row, from the task's own encoder."""
    config_lib.save_json(_config(), tmp_path / "config.json")
    spec = f"experiments/finetune.py:from={tmp_path},task=wn_lexname,seq_len=32,batch=8"
    config = config_lib.load_config(spec)
    batch = fits.synthetic_batch(config, 8, 0)
    assert batch["inputs"].shape == (8, 32) and batch["targets"].shape == (8,)
    _report_holds_the_state(config)


@pytest.mark.slow
def test_cli_reports_each_pipeline_stage():
    spec = "experiments/pipelines/bert_wn_lexname.py:size=tiny"
    command = [sys.executable, "-m", "kiln.tools.fits", "--config", spec]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = [line.split(":")[0] for line in result.stdout.splitlines() if "Train step" in line]
    assert stages == ["Stage pretrain", "Stage finetune", "Stage scratch"], result.stdout
