"""Train state and the pure, jitted train and eval steps shared by every model family.

`TrainState.params` is always the whole tree the model applies; a `peft.Partition` says which
part of it trains (all of it, or adapters and heads only): gradients, updates and the optimizer
state cover that part only, and the rest passes through each step unchanged."""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from kiln import losses, models, peft, sharding
from kiln.models import blocks

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key; step and microbatch are folded in, so resumes replay exactly


def init_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    seed: int,
    seq_len: int,
    partition: peft.Partition = peft.FULL,
) -> TrainState:
    """A fresh state (optimizer state over `partition`'s trainable part); call under `jax.jit`
    with the state shardings as `out_shardings`."""
    state_rng = jax.random.split(jax.random.PRNGKey(seed))[1]
    params = init_params(model, seed, seq_len)
    if model.config.scan_layers:  # Held stacked: the optimizer updates one leaf per stack.
        params = blocks.stack_blocks(params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(partition.trainable(params)),
        rng=state_rng,
    )


def init_params(model: nn.Module, seed: int, seq_len: int = 8) -> Any:
    """The fresh per-layer parameters of `init_state` (the same for any `seq_len`)."""
    params_rng = jax.random.split(jax.random.PRNGKey(seed))[0]
    return nn.unbox(model.init(params_rng, **models.example_inputs(model, seq_len))["params"])


def state_shardings(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    seq_len: int,
    partition: peft.Partition = peft.FULL,
) -> tuple[TrainState, TrainState]:
    """(abstract state, its shardings): params by their logical names, optimizer alike."""
    abstract_boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), **models.example_inputs(model, seq_len))["params"]
    )
    if model.config.scan_layers:
        abstract_boxed = blocks.stack_blocks(abstract_boxed)
    param_shardings = sharding.tree_shardings(abstract_boxed, mesh)
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, 0, seq_len, partition))
    replicated = sharding.replicated(mesh)
    # Optimizer leaves shaped like their parameter share its sharding; others (step counts,
    # Adafactor's factored row/column statistics) are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda leaf, s, param: s if leaf.shape == param.shape else replicated,
        abstract.opt_state,
        partition.trainable(param_shardings),
        partition.trainable(abstract.params),
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    shardings = TrainState(
        step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated
    )
    return abstract, shardings


def on_disk(state: Any) -> Any:
    """`state` (arrays, shapes or shardings) in the checkpoints' layout: per-layer blocks, so
    runs with and without `model.scan_layers` read each other's checkpoints."""
    return state.replace(
        params=blocks.unstack_blocks(state.params),
        opt_state=blocks.unstack_blocks(state.opt_state),
    )


def in_memory(state: Any) -> Any:
    """The inverse of `on_disk`: the layout of a `model.scan_layers` run, blocks stacked."""
    return state.replace(
        params=blocks.stack_blocks(state.params), opt_state=blocks.stack_blocks(state.opt_state)
    )


def _microbatches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B / count, ...]; microbatch i takes rows i, i + count, ...

    Interleaving keeps every microbatch spread over all data-parallel devices.
    """

    def split(x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0] // count, count, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def accumulate_grads(
    model: nn.Module,
    params: Any,
    batch: Batch,
    rng: jax.Array,
    count: int,
    loss: losses.LossFn,
    frozen: Any = None,
    partition: peft.Partition = peft.FULL,
) -> tuple[Any, dict[str, jax.Array]]:
    """Summed gradients (of `params`, the trainable part; the model applies it merged with
    `frozen`) and loss sums over `count` microbatches (one pass when count == 1)."""

    def grads_of(micro: Batch, micro_rng: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        def loss_fn(p: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
            out = loss(model, partition.merge(p, frozen), micro, micro_rng)
            sums = {k: out[k] for k in losses.SUM_KEYS}
            return sums["loss_sum"], sums

        return jax.grad(loss_fn, has_aux=True)(params)

    if count == 1:
        return grads_of(batch, rng)

    def body(carry: tuple[Any, Any], xs: tuple[Batch, jax.Array]) -> tuple[Any, None]:
        grads, sums = grads_of(*xs)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in losses.SUM_KEYS}
    rngs = jax.random.split(rng, count)
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (_microbatches(batch, count), rngs))
    return grads, sums


def train_step(
    state: TrainState,
    batch: Batch,
    lr_scale: jax.Array | float = 1.0,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int,
    loss: losses.LossFn,
    partition: peft.Partition = peft.FULL,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `loss` (a `losses.LossFn`) divided by the weight of the whole global
    batch: the mean over its tokens (or rows). The update is multiplied by `lr_scale` (every
    optimizer applies the learning rate last, so this scales it exactly; 1 changes no bit).

    The metrics include the norms of the gradient, the update and the updated parameters: the
    loop checks them (and the loss) for NaN/Inf before it keeps the new state (`divergence`).
    A norm past float32's range counts as non-finite: such parameters have diverged.
    Only `partition`'s trainable part is differentiated and updated; the rest is kept as is."""
    rng = jax.random.fold_in(state.rng, state.step)
    trainable, frozen = partition.split(state.params)
    grads, sums = accumulate_grads(
        model, trainable, batch, rng, grad_accum_steps, loss, frozen, partition
    )
    # Dividing the summed gradient by all tokens of the global batch makes k microbatches
    # exactly equivalent to one big batch, whatever the padding in each microbatch.
    denominator = jnp.maximum(sums["weight_sum"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    updates = jax.tree.map(lambda u: u * jnp.asarray(lr_scale, u.dtype), updates)
    params = partition.merge(optax.apply_updates(trainable, updates), frozen)
    metrics = {
        "loss": sums["loss_sum"] / denominator,
        "accuracy": sums["correct_sum"] / denominator,
        "tokens": sums["weight_sum"],
        "lr": schedule(state.step) * lr_scale,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def eval_step(
    params: Any, batch: Batch, *, model: nn.Module, loss: losses.LossFn
) -> dict[str, jax.Array]:
    """The loss's sums for one batch (add them up over batches) and, for a classifier, each
    row's predicted class (`classes`)."""
    return loss(model, params, batch, None)


def jit_steps(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    schedule: Callable[[jax.Array], jax.Array],
    grad_accum_steps: int,
    shardings: TrainState,
    mesh: Mesh,
    loss: losses.LossFn | None = None,
    partition: peft.Partition = peft.FULL,
) -> tuple[Callable, Callable]:
    """The train step `(state, batch, lr_scale=1.0)` (state donated) and eval step of `loss`
    (default: a language model's token cross-entropy, `losses.language_model()`), jitted with
    explicit shardings."""
    loss = loss or losses.language_model()
    batch = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    step = _ScaledStep(
        jax.jit(
            functools.partial(
                train_step,
                model=model,
                optimizer=optimizer,
                schedule=schedule,
                grad_accum_steps=grad_accum_steps,
                loss=loss,
                partition=partition,
            ),
            in_shardings=(shardings, batch, replicated),
            out_shardings=(shardings, replicated),
            donate_argnums=(0,),
        )
    )
    evaluate = jax.jit(
        functools.partial(eval_step, model=model, loss=loss),
        in_shardings=(shardings.params, batch),
        out_shardings=replicated,
    )
    return _bound(step, mesh), _bound(evaluate, mesh)


class _ScaledStep:
    """A jitted train step whose learning-rate scale is an argument with default 1 (a traced
    value: another scale needs no recompilation)."""

    def __init__(self, jitted: Callable) -> None:
        self._jitted = jitted

    def __call__(self, state: TrainState, batch: Batch, lr_scale: float = 1.0) -> Any:
        return self._jitted(state, batch, np.float32(lr_scale))

    def lower(self, state: Any, batch: Any, lr_scale: float = 1.0) -> Any:
        return self._jitted.lower(state, batch, np.float32(lr_scale))


def _bound(fn: Callable, mesh: Mesh) -> Callable:
    """Runs (or lowers) `fn` with the mesh and logical rules active, so activation constraints
    apply."""

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        with sharding.activation_rules(mesh):
            return fn(*args)

    def lower(*args: Any) -> Any:  # Ahead-of-time: `.lower(...).compile()`, as on a jit.
        with sharding.activation_rules(mesh):
            return fn.lower(*args)

    wrapper.lower = lower
    return wrapper
