"""Model families built from the shared layers in `layers.py`."""

from typing import Any

import flax.linen as nn

from kiln.models import gpt, layers

FAMILIES = {"gpt": gpt.GPT}


def transformer_config(model_config: Any) -> layers.TransformerConfig:
    """The frozen layer config from the experiment's `model` section (minus `family`)."""
    return layers.TransformerConfig(
        **{k: v for k, v in dict(model_config).items() if k != "family"}
    )


def build_model(model_config: Any) -> nn.Module:
    """The linen module for `model.family`."""
    return FAMILIES[model_config["family"]](transformer_config(model_config))
