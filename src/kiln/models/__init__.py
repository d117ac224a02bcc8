"""Model families built from the shared layers (`layers`, `attention`, `blocks`), and the one
table that describes them.

Code outside `models/` asks `family(name)` what a family can do (its input layout, objectives,
classification head and pooling, whether it generates) and never tests a family's name. A new
family is one model file plus one `Family` entry in `FAMILIES` (and its experiment files).
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kiln.data.objectives import MODULE_OBJECTIVES, OBJECTIVES, Layout
from kiln.errors import KilnError, config_error
from kiln.models import bert, electra, gpt, heads, layers, t5

SPAN = "span"  # the `pooling` of a span head (extractive QA): every position is scored
_INPUTS = {
    Layout.DECODER: ("inputs",),
    Layout.ENCODER: ("inputs",),
    Layout.ENCODER_DECODER: ("encoder_inputs", "decoder_inputs"),
}


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family is, for the code outside `models/`."""

    name: str
    module: type[nn.Module]  # the linen module for pre-training and generation
    layout: Layout  # how it takes its inputs (and so which data rows and objectives fit)
    classifier: type[nn.Module] | None = None  # its classification model; None: labels as text
    pooling: tuple[str, ...] = ()  # the classifier's pooling choices, the default first
    lm_head_transform: bool = False  # its LM head has a d_model x d_model dense before the output
    # `model` fields that only this family reads: another family's config must leave them at
    # their defaults (`check_model_section`), so that an override is never silently ignored.
    own_fields: tuple[str, ...] = ()
    # (field, value) pairs this family is built for (its module's `setup` checks them too).
    fixed_fields: tuple[tuple[str, Any], ...] = ()
    # Its classifier marks a sentence pair's second segment with token types (it then needs
    # model.type_vocab_size=2); otherwise the [SEP] between the texts is the only mark.
    pair_token_types: bool = False
    # Its extractive-QA model: start/end logits over positions (`pooling="span"`); None: the
    # family cannot fine-tune on extractive_qa tasks.
    span_head: type[nn.Module] | None = None
    # Pre-training objectives that train another module than `module` (objective.name -> it,
    # built with the `objective` section's fields that it names); its body keeps `module`'s
    # parameter names, so fine-tuning starts from it as from `module`.
    objective_modules: tuple[tuple[str, type[nn.Module], tuple[str, ...]], ...] = ()

    @property
    def inputs(self) -> tuple[str, ...]:
        """The token inputs `module.init` needs."""
        return _INPUTS[self.layout]

    @property
    def objectives(self) -> tuple[str, ...]:
        """Its pre-training `objective.name` values, the default first."""
        own = {name for name, _, _ in self.objective_modules}
        return tuple(o for o in OBJECTIVES[self.layout] if o not in MODULE_OBJECTIVES or o in own)

    @property
    def generates(self) -> bool:
        """Whether it decodes text (with a KV cache, `kiln.decoding`)."""
        return self.layout != Layout.ENCODER

    def uses_head(self, task_kind: str) -> bool:
        """Whether a task of `task_kind` trains a head (else the model answers in text):
        classification and regression (one output) on its classifier."""
        if task_kind == "extractive_qa":
            return self.span_head is not None
        return task_kind in ("classification", "regression") and self.classifier is not None

    def check_task_kind(self, task_kind: str, task_name: str) -> None:
        """Raises unless it can fine-tune on a task of `task_kind`."""
        if task_kind == "regression" and self.classifier is None:
            raise KilnError(
                f"Task {task_name!r} is a regression task, which needs a head with one output;"
                f" model.family={self.name!r} has none. Fine-tune a family with a classifier"
                f" ({', '.join(f.name for f in FAMILIES.values() if f.classifier)})."
            )
        if task_kind == "extractive_qa" and self.span_head is None:
            raise KilnError(
                f"Task {task_name!r} is an extractive QA task, which needs a span head over the"
                f" context's tokens; model.family={self.name!r} has none. Fine-tune a family"
                f" with one ({', '.join(f.name for f in FAMILIES.values() if f.span_head)}),"
                " or give the task as generation (input: question and context; target: the"
                " answer) in a JSONL file."
            )
        if task_kind == "generation" and not self.generates:
            raise KilnError(
                f"Task {task_name!r} is a generation task, which model.family={self.name!r}"
                " cannot do (it does not decode text): fine-tune a family that generates."
            )

    def check_pairs(self, type_vocab_size: int, task_name: str) -> None:
        """Raises unless its model (`model.type_vocab_size`) can read sentence pairs."""
        if self.pair_token_types and type_vocab_size != 2:
            raise config_error(
                "model.type_vocab_size",
                type_vocab_size,
                f"must be 2 for the sentence pairs of task {task_name!r}: a"
                f" model.family={self.name!r} classifier marks the second text with token type 1",
                "Fine-tune a model pre-trained with model.type_vocab_size=2 (BERT's original"
                " layout), or join the texts into one (a text field without text_pair).",
            )

    def check_pooling(self, pooling: str) -> None:
        """Raises unless `pooling` ("" = the default) is one of its classifier's poolings."""
        if not pooling or pooling in self.pooling:
            return
        if self.pooling:
            fix = f'Use one of {list(self.pooling)} (or "" for {self.pooling[0]!r}).'
        else:
            fix = 'Use "": it has no classification head.'
        why = f"is not available for model.family={self.name!r}"
        raise config_error("task.pooling", pooling, why, fix)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("gpt", gpt.GPT, Layout.DECODER, heads.GPTClassifier, ("last", "mean")),
        Family(
            "bert",
            bert.BERT,
            Layout.ENCODER,
            heads.BertClassifier,
            ("cls", "mean"),
            lm_head_transform=True,
            own_fields=("type_vocab_size",),
            pair_token_types=True,
            span_head=heads.BertSpanHead,
            objective_modules=(("electra", electra.Electra, ("generator_fraction",)),),
        ),
        Family(
            "t5",
            t5.T5,
            Layout.ENCODER_DECODER,
            own_fields=("n_decoder_layers", "relative_buckets", "relative_max_distance"),
            fixed_fields=t5.FIXED_FIELDS,
        ),
    )
}


def family(name: str) -> Family:
    """The `Family` named `name` (`model.family`)."""
    if name not in FAMILIES:
        raise KilnError(f"model.family={name!r} is unknown: use one of {list(FAMILIES)}.")
    return FAMILIES[name]


def family_of(model: nn.Module) -> Family:
    """The `Family` of a built model (its classification model included)."""
    for f in FAMILIES.values():
        own = (f.module, f.classifier, f.span_head, *(m for _, m, _ in f.objective_modules))
        if any(kind and isinstance(model, kind) for kind in own):
            return f
    raise KilnError(f"{type(model).__name__} is not a model of any family in kiln.models.")


def transformer_config(model_config: Any) -> layers.TransformerConfig:
    """The frozen layer config from the experiment's `model` section (minus `family`)."""
    fields = {k: v for k, v in dict(model_config).items() if k != "family"}
    return layers.TransformerConfig(**fields)


def check_model_section(model_config: Any) -> Family:
    """Checks the `model` section (the layer config's rules, the family's fixed fields, no
    other family's own field overridden); returns its `Family`."""
    fam, config = family(model_config["family"]), transformer_config(model_config)
    layers.check_fixed_fields(config, fam.name, fam.fixed_fields)
    default = {f.name: f.default for f in dataclasses.fields(layers.TransformerConfig)}
    for other in FAMILIES.values():
        for key in (k for k in other.own_fields if k not in fam.own_fields):
            if getattr(config, key) != default[key]:
                raise config_error(
                    f"model.{key}",
                    getattr(config, key),
                    f"is read by model.family={other.name!r} only; a model.family={fam.name!r}"
                    " model would ignore it",
                    f"Remove the override (default {default[key]!r}), or use"
                    f" model.family={other.name!r}.",
                )
    uses_gelu = config.mlp in ("gelu", "geglu") or fam.lm_head_transform  # BERT's MLM head.
    if not config.gelu_approximate and not uses_gelu:
        raise config_error(
            "model.gelu_approximate",
            False,
            f"has no GELU to apply to: model.mlp={config.mlp!r} in a model.family={fam.name!r}"
            " model",
            'Remove the override (default True), or use model.mlp="gelu" or "geglu".',
        )
    return fam


def build_model(
    model_config: Any,
    num_classes: int = 0,
    pooling: str = "",
    peft: dict[str, Any] | None = None,
    objective: Any = None,
) -> nn.Module:
    """The linen module for `model.family`; with `num_classes`, its classification model
    (`pooling` "" = the family's default, see `Family.pooling`; "span": its span head); `peft`:
    the layer config's LoRA and soft-prompt fields (`kiln.peft.Spec.model_fields`); without
    `num_classes`, the module that pre-trains with the `objective` section (None: `module`)."""
    fam, config = family(model_config["family"]), transformer_config(model_config)
    if peft:
        config = dataclasses.replace(config, **peft)
    if not num_classes:
        name = objective["name"] if objective is not None else ""
        for objective_name, module, fields in fam.objective_modules:
            if objective_name == name:
                return module(config, **{f: objective[f] for f in fields if f in objective})
        return fam.module(config)
    if pooling == SPAN:  # Extractive QA: start/end logits over positions.
        if fam.span_head is None:
            raise KilnError(f"model.family={fam.name!r} has no span head (extractive QA).")
        return fam.span_head(config)
    if fam.classifier is None:
        raise KilnError(f"model.family={fam.name!r} has no classification head.")
    fam.check_pooling(pooling)
    return fam.classifier(config, num_classes=num_classes, pooling=pooling or fam.pooling[0])


def example_inputs(model: nn.Module, seq_len: int) -> dict[str, jnp.ndarray]:
    """Zero token inputs for `model.init`; parameter shapes never depend on their length."""
    return {key: jnp.zeros((1, seq_len), jnp.int32) for key in family_of(model).inputs}
