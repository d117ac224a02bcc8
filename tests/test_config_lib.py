import json
import os
import pathlib
import threading

import ml_collections
import pytest

from kiln import config_lib, restore, validation
from kiln.errors import KilnError


def gpt_config(**overrides):
    config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def test_parse_arg_defaults_and_overrides():
    assert config_lib.parse_arg("size=small", size="tiny", style="gpt2") == {
        "size": "small",
        "style": "gpt2",
    }
    assert config_lib.parse_arg(None, size="tiny") == {"size": "tiny"}
    with pytest.raises(KilnError, match="sizee"):
        config_lib.parse_arg("sizee=small", size="tiny")
    with pytest.raises(KilnError, match="key=value"):
        config_lib.parse_arg("small", size="tiny")


def test_pick_lists_choices():
    with pytest.raises(KilnError, match="huge"):
        config_lib.pick("size", "huge", {"tiny": 1})


def test_tiny_config_validates():
    assert validation.validate(gpt_config(), 8) == (8, 1, 1)


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"model__d_model": 66}, "model.d_model"),
        ({"model__n_kv_heads": 3}, "model.n_kv_heads"),
        ({"data__seq_len": 4096}, "data.seq_len"),
        ({"data__global_batch_size": 12}, "data.global_batch_size"),
        ({"data__streams": 3}, "data.streams"),
        ({"model__scan_layers": True, "optim__name": "adafactor"}, "model.scan_layers"),
        ({"model__scan_layers": True, "optim__layer_decay": 0.8}, "model.scan_layers"),
        ({"data__streams": -1}, "data.streams"),
        ({"optim__grad_accum_steps": 3}, "data.global_batch_size"),
        ({"model__norm": "batchnorm"}, "model.norm"),
        ({"model__dropout": 1.5}, "model.dropout"),
        ({"train__steps": -1}, "train.steps"),
        ({"mesh__data": 16}, "mesh"),
        ({"objective__name": "mlm"}, "objective.name"),
        ({"objective__name": "span_corruption"}, "objective.name"),
    ],
)
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(KilnError) as error:
        validation.validate(gpt_config(**overrides), 8)
    assert key in str(error.value)


def family_config(family, **overrides):
    """The tiny pre-training config of `family`, with `section__key` overrides."""
    config = config_lib.load_config(f"experiments/{family}/pretrain.py:size=tiny")
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


@pytest.mark.parametrize(
    "family, key, value, owner",
    [
        ("gpt", "n_decoder_layers", 2, "t5"),
        ("gpt", "relative_buckets", 16, "t5"),
        ("bert", "relative_max_distance", 64, "t5"),
        ("gpt", "type_vocab_size", 2, "bert"),
        ("t5", "type_vocab_size", 2, "bert"),
    ],
)
def test_another_familys_field_is_an_error(family, key, value, owner):
    with pytest.raises(KilnError) as error:
        validation.validate(family_config(family, **{f"model__{key}": value}), 8)
    message = str(error.value)
    assert f"model.{key}={value}" in message
    assert f"model.family={family!r}" in message and f"model.family={owner!r}" in message


def test_own_fields_are_model_fields_and_their_owners_accept_them():
    from kiln import defaults, models

    section = defaults.model_section("gpt")
    for family in models.FAMILIES.values():
        assert set(family.own_fields) <= set(section), family.name
    validation.validate(family_config("t5", model__n_decoder_layers=3), 8)
    validation.validate(family_config("bert", model__type_vocab_size=2), 8)


@pytest.mark.parametrize(
    "family, overrides, key",
    [
        ("gpt", {"model__d_ff": 0}, "model.d_ff"),  # layers.TransformerConfig
        ("gpt", {"model__dtype": "float64"}, "model.dtype"),
        ("gpt", {"model__remat": "some"}, "model.remat"),
        ("gpt", {"model__relative_buckets": 2}, "model.relative_buckets"),
        ("t5", {"model__position": "rope"}, "model.position"),  # t5.FIXED_FIELDS
        ("t5", {"model__norm_position": "post"}, "model.norm_position"),
        ("bert", {"objective__mask_rate": 0.0}, "objective.mask_rate"),  # objectives
        ("t5", {"objective__noise_density": 1.0}, "objective.noise_density"),
        ("gpt", {"optim__b1": 1.0}, "optim.b1"),  # optim.make_optimizer
        ("gpt", {"optim__schedule": "step"}, "cosine, linear"),
        ("gpt", {"decode__top_p": 0.0}, "top_p"),  # decoding.DecodeOptions
        ("gpt", {"train__loss_chunks": -1}, "train.loss_chunks"),
        # data.finetune.check_task and Family.check_pooling, before the task is read.
        ("bert", {"task__name": "jsonl", "task__kind": "generation"}, "task.name"),
        ("bert", {"task__name": "wn_lexname", "task__pack": True}, "task.pack"),
        (
            "gpt",
            {"task__name": "jsonl", "task__kind": "classification", "task__pack": True},
            "task.pack",
        ),
        ("gpt", {"task__name": "wn_lexname", "task__pooling": "cls"}, "task.pooling"),
        ("t5", {"task__name": "wn_lexname", "task__pooling": "mean"}, "task.pooling"),
    ],
)
def test_rules_of_lower_levels_run_in_validate(family, overrides, key):
    with pytest.raises(KilnError) as error:
        validation.validate(family_config(family, **overrides), 8)
    assert key in str(error.value)


def test_fine_tune_task_options_that_fit_validate():
    validation.validate(family_config("gpt", task__name="kjv2web", task__pack=True), 8)
    validation.validate(family_config("bert", task__name="wn_lexname", task__pooling="mean"), 8)


def test_batch_not_divisible_by_processes():
    with pytest.raises(KilnError, match="process"):
        validation.validate(gpt_config(data__global_batch_size=8, mesh__data=1), 1, process_count=3)


def test_diff_and_json_round_trip(tmp_path):
    config = gpt_config()
    config_lib.save_json(config, tmp_path / "config.json")
    loaded = config_lib.load_json(tmp_path / "config.json")
    assert config_lib.diff(config_lib.to_dict(config), loaded.to_dict()) == []
    changed = ml_collections.ConfigDict(loaded.to_dict())
    changed.model.d_model = loaded.model.d_model * 2
    assert config_lib.diff(loaded.model.to_dict(), changed.model.to_dict(), "model.") == [
        f"model.d_model: {loaded.model.d_model} != {2 * loaded.model.d_model}"
    ]


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in pathlib.Path("experiments").rglob("*.py") if p.name != "finetune.py"),
)
def test_every_experiment_config_validates_at_tiny_size(path):
    config = config_lib.load_config(f"{path}:size=tiny")
    runs = [config[name] for name in config.stages] if "stages" in config else [config]
    for run_config in runs:  # A pipeline's stages are run configs.
        assert validation.validate(run_config, 8)
        with pytest.raises(AttributeError):  # locked: unknown keys fail
            run_config.model.no_such_key = 1


@pytest.mark.parametrize(
    "path", sorted(str(p) for p in pathlib.Path("experiments/pipelines").glob("*.py"))
)
@pytest.mark.parametrize("size", ["tiny", "cpu", "gpu"])
def test_pipeline_stages_share_the_pretrained_architecture(path, size):
    config = config_lib.load_config(f"{path}:size={size}")
    assert config.stages[0] == "pretrain" and not config.pretrain.task.name
    for name in config.stages[1:]:
        stage = config[name]
        # The fields a run may change from its source (restore.check_architecture) aside.
        own, source = stage.model.to_dict(), config.pretrain.model.to_dict()
        for field in restore.MAY_DIFFER:
            own.pop(field), source.pop(field)
        assert own == source, name
        assert stage.tokenizer.path == "@pretrain" and stage.task.name
        assert stage.init_from.workdir == ("" if name.startswith("scratch") else "@pretrain")
        assert validation.validate(stage, 8)


def test_write_atomically_never_exposes_a_partial_file(tmp_path):
    """A reader polling the file while it is rewritten sees one whole version or the other
    (a multi-process run reads config.json while process 0 rewrites it)."""
    path = tmp_path / "config.json"
    versions = [json.dumps({"v": i, "pad": "x" * 200_000}) for i in range(2)]
    config_lib.write_atomically(path, versions[0])
    done = threading.Event()

    def rewrite():
        for i in range(200):
            config_lib.write_atomically(path, versions[i % 2])
        done.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    reads = 0
    while not done.is_set():
        assert path.read_text() in versions
        reads += 1
    writer.join()
    assert reads > 0
    assert not [p for p in os.listdir(tmp_path) if p != "config.json"], "temporary file left"


def test_an_older_runs_model_section_reads_with_the_defaults_of_newer_fields(tmp_path):
    """A config.json written before `head_dim`/`gelu_approximate` existed still resumes: the
    missing fields read as their defaults, which is what that run computed with."""
    config = config_lib.load_config("experiments/bert/pretrain.py:size=tiny")
    old = config.to_dict()
    for key in ("head_dim", "gelu_approximate"):
        del old["model"][key]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(old))
    loaded = config_lib.load_json(path)
    assert loaded.model.to_dict() == config.model.to_dict()
    assert config_lib.diff(loaded.to_dict(), config_lib.to_dict(config)) == []


@pytest.mark.parametrize(
    "key, value",
    [
        ("checkpoint.every", 0),
        ("eval.every", 0),
        ("train.log_every", 0),
        ("train.log_every", -5),
        ("checkpoint.keep", -1),
        ("checkpoint.keep", 0),  # Exited 0 with no checkpoint left to resume from.
        ("checkpoint.keep_every", -1),
        ("train.stop_after", -1),
        ("eval.batches", 0),
        ("eval.sample_tokens", 0),
        ("tokenizer.max_sentences", 0),
        ("task.target_len", 0),
        ("task.train_examples", -1),
        ("init_from.step", -2),
        ("seed", -1),
        ("seed", 2**32),
        ("distributed.timeout_s", 0),
        ("distributed.process_id", -2),
        ("optim.head_lr", -1.0),
        ("optim.head_lr", float("nan")),
    ],
)
def test_every_numeric_field_is_range_checked(key, value):
    config = gpt_config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    with pytest.raises(KilnError) as error:
        validation.validate(config, 8)
    assert str(error.value).startswith(f"config: {key}={value!r} ")


def test_a_numeric_config_argument_must_be_a_number():
    assert config_lib.parse_arg("seed=3,lr=1e-4", seed="0", lr="1e-3") == {
        "seed": "3",
        "lr": "1e-4",
    }
    for bad in ("seed=abc", "seed=", "seed=nan"):
        with pytest.raises(KilnError, match="is not a number"):
            config_lib.parse_arg(bad, seed="0")
    assert config_lib.parse_arg("lrs=1e-3/3e-3", lrs="") == {"lrs": "1e-3/3e-3"}


def test_experiment_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(KilnError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "nope.py"))
    with pytest.raises(KilnError, match="is not a Python file"):
        config_lib.load_config("README.md")
    broken = tmp_path / "broken.py"
    broken.write_text("x = 1\ndef get_config(arg):\n    return (\n")
    with pytest.raises(KilnError, match=r"line 3: '\(' was never closed"):
        config_lib.load_config(str(broken))
    raises = tmp_path / "raises.py"
    raises.write_text("def get_config(arg):\n    return int(arg)\n")
    with pytest.raises(KilnError, match="failed at line 2 .* ValueError: invalid literal"):
        config_lib.load_config(f"{raises}:x")
    (tmp_path / "none.py").write_text("def get_config(arg):\n    return None\n")
    with pytest.raises(KilnError, match="not an ml_collections.ConfigDict"):
        config_lib.load_config(str(tmp_path / "none.py"))


@pytest.mark.parametrize(
    "text, why",
    [
        (b"\xff\xfe{", "not JSON text"),
        (b"{garbage", "not JSON text"),
        (b"[1, 2]", "a JSON list, not an object"),
        (b'{"train": 5}', "'train' section is not an object"),
        (b'{"a.b": 1}', "keys a config cannot hold"),
    ],
)
def test_a_damaged_config_json_is_a_kiln_error(tmp_path, text, why):
    path = tmp_path / "config.json"
    path.write_bytes(text)
    with pytest.raises(KilnError, match=why):
        config_lib.load_json(path)


def test_no_error_message_names_a_config_key_that_does_not_exist():
    """Messages like "tokenizer.vocab_size=... Increase tokenizer.vocab_size" sent users to a
    key no config has (it is model.vocab_size)."""
    import re

    from kiln import defaults

    keys = {"seed"}
    for objective in ("", "electra"):  # electra adds its own objective fields
        sections = {
            **defaults.run_sections(seq_len=1, batch=1, steps=1, lr=0.0, objective=objective)
        }
        sections["model"] = defaults.model_section("gpt")
        for section, fields in sections.items():
            keys |= {f"{section}.{name}" for name in getattr(fields, "keys", list)()}
    # make_objective's own arguments, checked by name; no config sets them.
    api_only = {"objective.mask_token_fraction", "objective.random_token_fraction"}
    named = re.compile(rf"(?<![\w.])((?:{'|'.join(sections)})\.[a-z_]+)=")
    wrong = []
    for path in sorted(pathlib.Path("src/kiln").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for key in named.findall(line):
                if key not in keys | api_only and ('"' in line or "'" in line):
                    wrong.append(f"{path}:{number}: {key}")
    assert not wrong, wrong
