"""Tests for the model-section rules of kiln.models (the Family table's validation)."""

import dataclasses

import pytest

from kiln import defaults, models
from kiln.errors import KilnError
from kiln.models import layers


def test_model_section_has_every_layer_field_at_its_default():
    section = defaults.model_section("gpt")
    for field in dataclasses.fields(layers.TransformerConfig):
        if field.name in layers.PEFT_FIELDS:  # From the `finetune` section.
            continue
        assert field.name in section, field.name
        if field.default is not dataclasses.MISSING:
            assert section[field.name] == field.default, field.name


@pytest.mark.parametrize(
    "family, fields",
    [
        ("gpt", {"mlp": "gelu"}),
        ("t5", {"mlp": "geglu", "position": "none"}),
        ("bert", {"mlp": "swiglu"}),  # Its MLM head still applies a GELU.
    ],
)
def test_exact_gelu_is_accepted_where_a_gelu_runs(family, fields):
    section = defaults.model_section(family, gelu_approximate=False, **fields)
    assert models.check_model_section(section).name == family


@pytest.mark.parametrize(
    "family, fields",
    [("gpt", {"mlp": "swiglu"}), ("t5", {"mlp": "relu", "position": "none"})],
)
def test_exact_gelu_without_a_gelu_is_an_error(family, fields):
    section = defaults.model_section(family, gelu_approximate=False, **fields)
    with pytest.raises(KilnError, match="model\\.gelu_approximate=False"):
        models.check_model_section(section)


def test_head_dim_frees_d_model_from_n_heads():
    section = defaults.model_section("t5", d_model=40, n_heads=6, n_kv_heads=6, position="none")
    with pytest.raises(KilnError, match="model\\.d_model=40"):
        models.check_model_section(section)
    section.head_dim = 16
    models.check_model_section(section)
    assert models.transformer_config(section).head_dim == 16
