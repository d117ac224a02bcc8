"""A LoRA fine-tune as a run: adapters-only checkpoints with a base pointer, exact resume, the
merged run (`kiln.tools.convert --merge`) and its Hugging Face export."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from kiln import arms, checkpoint, config_lib, peft, restore, run
from kiln.errors import KilnError
from kiln.tools import convert

pytestmark = pytest.mark.slow


def _pretrain_config():
    config = config_lib.load_config("experiments/bert/pretrain.py:size=micro")
    config.model.d_model = 32
    config.model.d_ff = 64
    config.data.seq_len = 16
    config.tokenizer.max_sentences = 1000
    config.train.steps = 1
    config.checkpoint.every = 1
    return config


def _lora_config(pretrain, source: str):
    config = arms.finetune_stage(
        pretrain,
        task="wn_lexname",
        train_examples=24,
        epochs=1.0,  # 3 steps of 8
        lr=1e-2,
        seq_len=16,
        batch=8,
        init_from=source,
    )
    config.tokenizer.path = source
    config.task.eval_examples = 8
    config.finetune.lora.rank = 4
    config.finetune.lora.dropout = 0.1
    config.checkpoint.every = 1
    return config


def _saved_params(workdir: str, step: int) -> dict:
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        raw = ckpt.restore_raw(step)
    finally:
        ckpt.close()
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(raw["params"], sep="/").items()}


def test_lora_run_saves_adapters_resumes_exactly_and_merges(tmp_path, capsys):
    source = str(tmp_path / "pretrain")
    pretrain = _pretrain_config()
    run.train_and_evaluate(pretrain, source)
    config = _lora_config(pretrain, source)
    interrupted, straight = str(tmp_path / "lora"), str(tmp_path / "lora_straight")
    config.train.stop_after = 2
    assert run.train_and_evaluate(config, interrupted) == {"step": 2}
    assert "PEFT:" in capsys.readouterr().out
    config.train.stop_after = 0
    resumed = run.train_and_evaluate(config, interrupted)
    assert "resuming from this workdir's checkpoint at step 2" in capsys.readouterr().out
    uninterrupted = run.train_and_evaluate(config, straight)
    for key in ("test/loss", "test/accuracy", "validation/loss"):
        assert resumed[key] == uninterrupted[key], key
    config.finetune.lora.rank = 2  # The adapters are part of what the run computes.
    with pytest.raises(KilnError, match="holds a different run.*finetune.lora.rank"):
        run.train_and_evaluate(config, interrupted)
    config.finetune.lora.rank = 4

    saved = _saved_params(interrupted, 3)
    assert saved and all(peft.is_trainable(p) for p in saved)  # No base weight in it.
    assert any(p.endswith("lora_a") for p in saved) and "classifier/kernel" in saved
    np.testing.assert_array_equal(
        saved["classifier/kernel"], _saved_params(straight, 3)["classifier/kernel"]
    )
    pointer = json.load(open(os.path.join(interrupted, peft.BASE)))
    assert pointer["workdir"] == os.path.abspath(source) and pointer["step"] == 1

    merged_dir = convert.merge_lora(interrupted, str(tmp_path / "merged"))
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    lora_src = restore.resolve(_spec(interrupted))
    merged_src = restore.resolve(_spec(merged_dir))
    lora_model, lora_params = restore.params_for_inference(lora_src, mesh, 45)
    plain_model, plain_params = restore.params_for_inference(merged_src, mesh, 45)
    # The base in the LoRA run's tree is the pre-training's, bit for bit.
    base = _saved_params(source, 1)
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(lora_params, sep="/").items()}
    np.testing.assert_array_equal(
        flat["block_0/attn/query/kernel"], base["block_0/attn/query/kernel"]
    )
    rng = np.random.default_rng(0)
    inputs = rng.integers(3, 512, (4, 16)).astype(np.int32)
    ours = lora_model.apply({"params": lora_params}, inputs)
    theirs = plain_model.apply({"params": plain_params}, inputs)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)

    exported = tmp_path / "hf"
    convert.export_hf(merged_dir, str(exported))
    assert (exported / "model.safetensors").exists()
    with pytest.raises(KilnError, match="no LoRA adapters"):
        convert.merge_lora(merged_dir, str(tmp_path / "again"))


def _spec(workdir: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"workdir": workdir, "step": -1, "hf": ""})
