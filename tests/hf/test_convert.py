"""`python -m kiln.tools.convert` and init_from from HF checkpoints: the CLI round trip, the
other weight formats, export of kiln-trained runs, and the errors on bad input."""

import json
import os
import pathlib
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from kiln import config_lib, defaults, models, restore, run, validation
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError
from kiln.hf import checkpoints, files
from kiln.tools import convert

from . import lm_checks
from .lm_checks import TOL

REPO = pathlib.Path(__file__).resolve().parents[2]


def _flat(tree) -> dict:
    return {
        "/".join(str(k.key) for k in path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def _assert_same_params(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert sorted(a) == sorted(b)
    for path in a:
        assert np.array_equal(a[path], b[path]), path


def _init_from(**fields) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict({"workdir": "", "hf": "", "step": -1})
    section.update(fields)
    return section


def test_cli_round_trip_and_init_from_workdir(gpt2_dir, tmp_path):
    workdir, out = str(tmp_path / "kiln"), str(tmp_path / "hf")
    assert convert.main(["--from-hf", gpt2_dir, "--out", workdir]) == 0
    imported = checkpoints.load(gpt2_dir)
    # The imported workdir is a source like any run: same model section, all parameters.
    source = restore.resolve(_init_from(workdir=workdir))
    assert source.step == 0
    restore.check_architecture(imported.model, source)
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    _, params = restore.params_for_inference(source, mesh)
    _assert_same_params(params, imported.params)
    # ... and init_from.hf gives the same parameters without writing anything.
    _, from_hf = restore.params_for_inference(restore.resolve(_init_from(hf=gpt2_dir)), mesh)
    _assert_same_params(from_hf, imported.params)

    assert convert.main(["--to-hf", "--workdir", workdir, "--out", out]) == 0
    original, exported = files.read_tensors(gpt2_dir), files.read_tensors(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["bos_token_id"], config["eos_token_id"]) == (lm_checks.BOS, lm_checks.EOS)
    # HF's initializer_range is kiln's init_std (the std fresh heads start from), both ways.
    assert imported.model.init_std == config["initializer_range"] == 0.05
    tokens = np.random.RandomState(0).randint(0, lm_checks.VOCAB, (1, 10))
    before = lm_checks.hf_logits(lm_checks.load_hf(gpt2_dir), tokens)
    np.testing.assert_array_equal(lm_checks.hf_logits(lm_checks.load_hf(out), tokens), before)
    text = "a word of the lexicon (noun.Tops)"
    want = transformers.AutoTokenizer.from_pretrained(gpt2_dir)(text).input_ids
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == want


def test_sharded_safetensors_pytorch_bin_and_flax_msgpack_import_the_same(gpt2_dir, tmp_path):
    want = checkpoints.load(gpt2_dir).params
    hf_model = lm_checks.load_hf(gpt2_dir)
    sharded, torch_bin, flax_dir = (str(tmp_path / n) for n in ("sharded", "bin", "flax"))
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    hf_model.save_pretrained(torch_bin, safe_serialization=False)
    assert os.listdir(torch_bin).count("pytorch_model.bin") == 1
    flax_model = transformers.FlaxGPT2LMHeadModel.from_pretrained(gpt2_dir, from_pt=True)
    flax_model.save_pretrained(flax_dir)
    assert "model.safetensors" not in os.listdir(flax_dir)
    for path in (sharded, torch_bin, flax_dir):
        _assert_same_params(checkpoints.load(path).params, want)


def test_a_base_model_save_with_mask_buffers_imports(gpt2_dir, tmp_path):
    """Hub GPT-2 files name tensors without `transformer.` and keep the causal-mask buffers
    (`h.N.attn.bias`): the same parameters, nothing reported unused."""
    base = str(tmp_path / "base")
    lm_checks.load_hf(gpt2_dir).transformer.save_pretrained(base)
    tensors = dict(files.read_tensors(base))
    assert "wte.weight" in tensors
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.bool_))
    files.write_safetensors(os.path.join(base, "model.safetensors"), tensors)
    imported = checkpoints.load(base)
    _assert_same_params(imported.params, checkpoints.load(gpt2_dir).params)
    assert imported.unused == ()


def _tiny_hf_model(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    bert = dict(
        vocab_size=1001,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    if kind == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(**bert))
    if kind == "bert_classifier":
        config = transformers.BertConfig(**bert, num_labels=3)
        return transformers.BertForSequenceClassification(config)
    config = transformers.T5Config(
        vocab_size=1001, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4
    )
    return transformers.T5ForConditionalGeneration(config)


@pytest.mark.parametrize(
    "kind,hf_class",
    [
        ("bert", "BertForMaskedLM"),
        ("bert_classifier", "BertForSequenceClassification"),
        ("t5", "T5ForConditionalGeneration"),
    ],
)
def test_cli_round_trip_of_bert_and_t5(tmp_path, kind, hf_class):
    """The CLI dispatches every model_type through kiln.hf.architecture, both ways."""
    hf_dir, workdir, out = (str(tmp_path / n) for n in ("hf", "kiln", "out"))
    _tiny_hf_model(kind).save_pretrained(hf_dir)
    assert convert.main(["--from-hf", hf_dir, "--out", workdir]) == 0
    assert convert.main(["--to-hf", "--workdir", workdir, "--out", out]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["architectures"] == [hf_class]
    original, exported = files.read_tensors(hf_dir), files.read_tensors(out)
    assert sorted(original) == sorted(exported)
    for name in original:
        assert np.array_equal(original[name], exported[name]), name
    if kind == "bert_classifier":  # init_from takes the classifier the import holds.
        source = restore.resolve(_init_from(workdir=workdir))
        model = models.build_model(source.config.model, num_classes=3)
        boxed = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), **models.example_inputs(model, 8))
        )
        loaded, fresh, _ = restore.plan(source, nn.unbox(boxed)["params"], skip="")
        assert not fresh and "classifier/kernel" in loaded


def _tiny_run_config(style: str) -> ml_collections.ConfigDict:
    config = config_lib.load_config(f"experiments/gpt/pretrain.py:size=tiny,style={style}")
    config.data.data_dir = "data/tiny"
    config.model.vocab_size = 512
    config.model.max_len = config.data.seq_len = 32
    config.data.global_batch_size = 8
    config.eval.batches = 1
    config.eval.sample_prompt = ""
    config.tokenizer.max_sentences = 2000
    config.train.steps = config.checkpoint.every = 2
    return config


@pytest.mark.parametrize(
    "style,hf_class", [("gpt2", "GPT2LMHeadModel"), ("modern", "LlamaForCausalLM")]
)
def test_export_of_a_kiln_trained_run(tmp_path, style, hf_class):
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    config = _tiny_run_config(style)
    run.train_and_evaluate(config, workdir)
    assert convert.main(["--to-hf", "--workdir", workdir, "--out", out]) == 0
    hf_config = json.load(open(os.path.join(out, "config.json")))
    assert hf_config["architectures"] == [hf_class]
    assert (hf_config["pad_token_id"], hf_config["bos_token_id"], hf_config["eos_token_id"]) == (
        0,
        2,
        3,
    )
    source = restore.resolve(_init_from(workdir=workdir))
    mesh = jax.sharding.Mesh(
        np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
    )
    model, params = restore.params_for_inference(source, mesh)
    tokens = np.random.RandomState(0).randint(0, 512, (2, 20))
    ours = np.asarray(model.apply({"params": params}, tokens))
    theirs = lm_checks.hf_logits(lm_checks.load_hf(out), tokens)
    assert np.abs(ours - theirs).max() < TOL
    text = "In the beginning God created the heaven and the earth."
    kiln_ids = tokenizer_lib.load_tokenizer(os.path.join(workdir, "tokenizer.model")).encode(text)
    assert transformers.AutoTokenizer.from_pretrained(out)(text).input_ids == kiln_ids


def test_export_refuses_what_no_hf_architecture_expresses():
    section = defaults.model_section("gpt", norm="rmsnorm").to_dict()  # learned positions
    model = models.build_model(defaults.model_section("gpt", norm="rmsnorm"))
    params = nn.unbox(
        jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), **models.example_inputs(model, 8))["params"]
        )
    )
    with pytest.raises(
        KilnError, match=r"gpt2 needs model.norm='layernorm'.*llama needs model.position='rope'"
    ):
        checkpoints.export(section, params)


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path: str, **changes) -> None:
    config_path = os.path.join(path, "config.json")
    config = json.load(open(config_path))
    config.update(changes)
    json.dump(config, open(config_path, "w"))


def test_bad_directories_fail_clearly(gpt2_dir, tmp_path):
    with pytest.raises(KilnError, match="has no config.json"):
        checkpoints.load(str(tmp_path))
    with pytest.raises(KilnError, match="is not a directory"):
        checkpoints.load(str(tmp_path / "missing"))
    unsupported = _copy(gpt2_dir, tmp_path / "neox")
    _edit_config(unsupported, model_type="gpt_neox")
    with pytest.raises(
        KilnError, match=r"'gpt_neox' is not supported.*\['bert', 'gpt2', 'llama', 't5'\]"
    ):
        checkpoints.load(unsupported)
    shorter = _copy(gpt2_dir, tmp_path / "shorter")
    _edit_config(shorter, n_positions=32)
    with pytest.raises(
        KilnError, match=r"'transformer.wpe.weight' has shape \(64, 64\).*\(32, 64\)"
    ):
        checkpoints.load(shorter)
    incomplete = _copy(gpt2_dir, tmp_path / "incomplete")
    tensors = dict(files.read_tensors(incomplete))
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    files.write_safetensors(os.path.join(incomplete, "model.safetensors"), tensors)
    with pytest.raises(KilnError, match=r"'transformer.h.1.mlp.c_fc.bias' is missing"):
        checkpoints.load(incomplete)
    no_weights = _copy(gpt2_dir, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(KilnError, match="has no weights"):
        checkpoints.load(no_weights)
    assert convert.main(["--from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_config_rules_of_init_from_hf():
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    config.init_from.hf = "some/dir"
    config.init_from.workdir = "runs/x"
    with pytest.raises(KilnError, match="init_from.hf='some/dir' is set together"):
        validation.validate(config, 1)
    config.init_from.workdir = ""
    config.init_from.load = "state"
    with pytest.raises(KilnError, match="init_from.hf=.*no optimizer state"):
        validation.validate(config, 1)
