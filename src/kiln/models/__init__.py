"""Model families built from the shared layers in `layers.py`."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kiln.errors import KilnError
from kiln.models import bert, gpt, heads, layers, t5

# family -> (module class, the token inputs `init` needs)
FAMILIES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "gpt": (gpt.GPT, ("inputs",)),
    "bert": (bert.BERT, ("inputs",)),
    "t5": (t5.T5, ("encoder_inputs", "decoder_inputs")),
}


def transformer_config(model_config: Any) -> layers.TransformerConfig:
    """The frozen layer config from the experiment's `model` section (minus `family`)."""
    fields = {k: v for k, v in dict(model_config).items() if k != "family"}
    return layers.TransformerConfig(**fields)


# family -> its classification-head module (t5 classifies text to text, without a head)
CLASSIFIERS: dict[str, type[nn.Module]] = {
    "gpt": heads.GPTClassifier,
    "bert": heads.BertClassifier,
}


POOLING = {"gpt": ("last", "mean"), "bert": ("cls", "mean")}  # the first is the default


def build_model(model_config: Any, num_classes: int = 0, pooling: str = "") -> nn.Module:
    """The linen module for `model.family`; with `num_classes`, its classification model
    (`pooling` "" = the family's default, see `POOLING`)."""
    family, config = model_config["family"], transformer_config(model_config)
    if num_classes:
        choices = POOLING[family]
        if pooling and pooling not in choices:
            raise KilnError(
                f"task.pooling={pooling!r} is not available for model.family={family!r}; use"
                f' one of {list(choices)} (or "" for {choices[0]!r}).'
            )
        return CLASSIFIERS[family](config, num_classes=num_classes, pooling=pooling or choices[0])
    return FAMILIES[family][0](config)


def example_inputs(model: nn.Module, seq_len: int) -> dict[str, jnp.ndarray]:
    """Zero token inputs for `model.init`; parameter shapes never depend on their length."""
    keys = next(keys for cls, keys in FAMILIES.values() if isinstance(model, cls))
    return {key: jnp.zeros((1, seq_len), jnp.int32) for key in keys}
