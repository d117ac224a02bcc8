"""One `build(config)`: the model and what its train and eval steps need, for the run loop,
`kiln.tools.fits`, the benchmarks and the tests alike."""

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import optax

from kiln import defaults, losses, models, optim, peft, sharding, train
from kiln.data.objectives import Layout
from kiln.errors import config_error


@dataclasses.dataclass(frozen=True)
class Built:
    """A run's model, optimizer, mesh, state layout and jitted steps."""

    model: nn.Module
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    abstract: train.TrainState  # shapes of the state as training holds it
    shardings: train.TrainState  # where each leaf of the state lives on the mesh
    train_step: Callable  # (state, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # (params, batch) -> loss sums (and classes for a classifier)
    seq_len: int
    finetune: peft.Spec = peft.Spec()  # the `finetune` section: LoRA, prompt tuning, neither

    @property
    def partition(self) -> peft.Partition:
        """Which parameters train: all, or (PEFT) the adapters and heads only."""
        return peft.Partition(self.finetune.enabled)

    def fresh_state(self, seed: int) -> train.TrainState:
        """A new train state from `seed`, created on its shardings."""
        init = jax.jit(
            lambda: train.init_state(
                self.model, self.optimizer, seed, self.seq_len, self.partition
            ),
            out_shardings=self.shardings,
        )
        with sharding.activation_rules(self.mesh):
            return init()


def build(
    config: ml_collections.ConfigDict,
    num_classes: int = 0,
    devices: Sequence[jax.Device] | None = None,
) -> Built:
    """Everything the steps of `config` need: the model of its `model` section (with a head of
    `num_classes` classes, pooled as `task.pooling` says, when > 0), the `optim` section's
    schedule and optimizer over `train.steps`, the `mesh` over `devices` (default: all), the
    state shardings at `data.seq_len`, and the jitted steps (`optim.grad_accum_steps`
    microbatches, `train.loss_chunks`), with the adapters of the `finetune` section (`peft`)."""
    pooling = config.task.pooling if "task" in config else ""
    spec = peft.spec(config)
    fam = models.family(config.model.family)
    if spec.prompt_length and fam.layout == Layout.DECODER and not num_classes:
        why = "is a decoder-only fine-tune without a head, which decodes with the KV cache"
        fix = "Use finetune.lora for it; prompt tuning suits head and encoder inputs."
        raise config_error("finetune.prompt_tuning.length", spec.prompt_length, why, fix)
    # A pre-training run's objective may train a module of its own (ELECTRA's generator).
    pretraining = not num_classes and not ("task" in config and config.task.name)
    objective = config.get("objective") if pretraining else None
    model = models.build_model(config.model, num_classes, pooling, spec.model_fields(), objective)
    steps = config.train.steps
    schedule = optim.make_schedule(config.optim, steps)
    optimizer = optim.make_optimizer(config.optim, steps, config.model.n_layers)
    mesh = sharding.make_mesh(config.mesh, devices)
    seq_len = config.data.seq_len
    partition = peft.Partition(spec.enabled)
    abstract, shardings = train.state_shardings(model, optimizer, mesh, seq_len, partition)
    peft.check_targets(spec, abstract.params)
    # The loss belongs to what the run trains: a classification head, or a language model.
    if num_classes:
        loss = losses.classifier
    elif objective is not None and objective.name == "electra":
        rtd_weight = defaults.electra_fields(objective)["rtd_weight"]
        loss = losses.replaced_token_detection(objective.mask_rate, rtd_weight)
    else:
        loss = losses.language_model(config.train.get("loss_chunks", 0))
    train_step, eval_step = train.jit_steps(
        model, optimizer, schedule, config.optim.grad_accum_steps, shardings, mesh, loss, partition
    )
    return Built(
        model, schedule, optimizer, mesh, abstract, shardings, train_step, eval_step, seq_len, spec
    )
