"""Run set-up pieces: tokenizer reuse from another workdir, workdir identity checks."""

import pytest

from kiln import config_lib, inputs
from kiln import workdir as workdir_lib
from kiln.data import tokenizer
from kiln.errors import KilnError

TEXTS = [f"line {i}: " + " ".join(f"word{j % 37}" for j in range(i % 23)) for i in range(400)]


def tiny_config(**tokenizer_fields):
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.model.vocab_size = 512
    for key, value in tokenizer_fields.items():
        config.tokenizer[key] = value
    return config


def test_tokenizer_is_reused_from_another_workdir(tmp_path):
    source = tmp_path / "pretrain"
    source.mkdir()
    trained = tokenizer.train_tokenizer(TEXTS, source / "tokenizer.model", vocab_size=512)
    workdir = tmp_path / "next"
    workdir.mkdir()
    tok = inputs.prepare_tokenizer(tiny_config(path=str(source)), str(workdir), ["unused"])
    assert (workdir / "tokenizer.model").read_bytes() == (source / "tokenizer.model").read_bytes()
    assert tok.encode("line 7: word3") == trained.encode("line 7: word3")


def test_missing_or_mismatched_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(KilnError, match="tokenizer.path"):
        inputs.prepare_tokenizer(tiny_config(path=str(tmp_path / "nowhere")), str(tmp_path), [])
    tokenizer.train_tokenizer(TEXTS, tmp_path / "src.model", vocab_size=600)
    workdir = tmp_path / "w"
    workdir.mkdir()
    with pytest.raises(KilnError, match="model.vocab_size"):
        inputs.prepare_tokenizer(tiny_config(path=str(tmp_path / "src.model")), str(workdir), [])


def test_resuming_with_a_different_objective_is_refused(tmp_path):
    config = tiny_config()
    workdir_lib.prepare(config, str(tmp_path))
    workdir_lib.prepare(config, str(tmp_path))  # the same run: fine
    config.objective.name = "prefix_lm"
    with pytest.raises(KilnError, match="objective.name"):
        workdir_lib.prepare(config, str(tmp_path))


def test_a_workdir_written_before_a_model_field_existed_resumes(tmp_path):
    """A saved model section without a field added since (init_std) holds that field's
    default, the value the run computed with; a changed value is still refused."""
    import json

    config = tiny_config()
    workdir_lib.prepare(config, str(tmp_path))
    path = tmp_path / workdir_lib.CONFIG
    saved = json.loads(path.read_text())
    del saved["model"]["init_std"]
    path.write_text(json.dumps(saved))
    workdir_lib.prepare(config, str(tmp_path))  # 0.02, as before the field existed: fine
    path.write_text(json.dumps(saved))
    config.model.init_std = 0.05
    with pytest.raises(KilnError, match="model.init_std"):
        workdir_lib.prepare(config, str(tmp_path))
