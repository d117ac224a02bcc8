"""Optimizers and learning-rate schedules built from the ``optim`` config section."""

import functools
import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.core import meta

from kiln.errors import KilnError

OPTIMIZERS = ("adamw", "adafactor", "sgd")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def _get(cfg: Any, key: str) -> Any:
    try:
        return cfg[key]
    except (KeyError, AttributeError):
        raise KilnError(
            f"optim.{key} is missing; add it to the optim section of the config."
        ) from None


def _choice(cfg: Any, key: str, valid: tuple[str, ...]) -> str:
    value = _get(cfg, key)
    if value not in valid:
        raise KilnError(f"optim.{key}={value!r} is not supported; use one of {', '.join(valid)}.")
    return value


def _num(cfg: Any, key: str, ok: Callable[[Any], bool], want: str, integer: bool = False) -> Any:
    value = _get(cfg, key)
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise KilnError(f"optim.{key}={value!r} is invalid; set it to {want}.")
    if not ok(value):
        raise KilnError(f"optim.{key}={value!r} is out of range; set it to {want}.")
    return value


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """Returns the learning rate as a (jittable) function of the step.

    ``step`` counts the updates done before this one (optax's count, 0 for the first update);
    with ``u = step + 1`` the update's number and ``w = round(warmup_fraction * total_steps)``
    warmup updates, warmup ramps linearly: update ``u <= w`` gets ``lr * u / w`` (so the first
    update already moves, and update ``w`` has the peak). After it, with ``t = clip((u - w) /
    (total_steps - w), 0, 1)`` and ``f = end_lr_fraction``: cosine ``lr * (f + (1 - f) * (1 +
    cos(pi * t)) / 2)``, linear ``lr * (1 - (1 - f) * t)``, rsqrt ``lr * sqrt(max(w, 1) /
    max(u, w, 1))``, constant ``lr``; the last update (``u = total_steps``) has ``t = 1``.
    Steps past ``total_steps`` keep the final value. As a fraction of ``total_steps``, the
    warmup follows a changed ``train.steps``.

    Raises:
        KilnError: on an unknown schedule or out-of-range ``lr``, ``warmup_fraction``,
            ``end_lr_fraction`` or ``total_steps``.
    """
    name = _choice(optim_cfg, "schedule", SCHEDULES)
    lr = float(_num(optim_cfg, "lr", lambda v: v >= 0, "a number >= 0, e.g. 3e-4"))
    warmup_fraction = _num(
        optim_cfg, "warmup_fraction", lambda v: 0 <= v <= 1, "a number in [0, 1]"
    )
    frac = float(_num(optim_cfg, "end_lr_fraction", lambda v: 0 <= v <= 1, "a number in [0, 1]"))
    if (
        isinstance(total_steps, bool)
        or not isinstance(total_steps, numbers.Integral)
        or total_steps < 1
    ):
        raise KilnError(f"total_steps={total_steps!r} is invalid; set it to an integer >= 1.")
    warmup = round(warmup_fraction * int(total_steps))
    decay_steps = max(int(total_steps) - warmup, 1)
    floor = max(warmup, 1)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        update = jnp.asarray(step, jnp.float32) + 1.0
        t = jnp.clip((update - warmup) / decay_steps, 0.0, 1.0)
        if name == "cosine":
            after = lr * (frac + (1.0 - frac) * 0.5 * (1.0 + jnp.cos(jnp.pi * t)))
        elif name == "linear":
            after = lr * (1.0 - (1.0 - frac) * t)
        elif name == "rsqrt":
            after = lr * jnp.sqrt(floor / jnp.maximum(update, floor))
        else:
            after = jnp.full_like(update, lr)
        return jnp.where(update <= warmup, lr * update / floor, after)

    return schedule


def learning_rate_at(optim_cfg: Any, total_steps: int, step: int) -> float:
    """Returns the scheduled learning rate at ``step`` as a Python float (for logging)."""
    return float(make_schedule(optim_cfg, total_steps)(step))


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


_DECAYED = ("kernel", "lora_a", "lora_b")


def weight_decay_mask(params: Any) -> Any:
    """Returns a tree like ``params`` that is True exactly at the matmul weights: leaves named
    ``kernel`` and LoRA adapters (``lora_a``, ``lora_b``).

    Biases, norm scales, embeddings and soft prompts are never decayed. Flax metadata boxes (e.g.
    ``nn.Partitioned``) are kept, holding a bool, so the mask matches the params structure.
    """

    def decide(path: tuple[Any, ...], leaf: Any) -> Any:
        last = path[-1] if path else None
        flag = getattr(last, "key", getattr(last, "name", None)) in _DECAYED
        return leaf.replace_boxed(flag) if _is_box(leaf) else flag

    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=_is_box)


HEAD_MODULES = ("pooler", "classifier")  # top-level modules of the task heads
_EMBEDDINGS = ("token_embed", "position_embed", "type_embed", "embed_norm", "relpos_bias")


def lr_scale(path: str, *, head_ratio: float, freeze_body: bool, layer_decay: float, n_layers: int):
    """Multiplier of the scheduled lr for the parameter at `path` ("block_3/attn/query/kernel").

    Heads (`HEAD_MODULES`) get `head_ratio`; with `freeze_body` everything else gets 0. Layer-wise
    decay: block i (of n, in each stack) gets `layer_decay ** (n - i)`, embeddings and T5's
    relative-position tables `layer_decay ** (n + 1)`, final norms and heads 1.
    """
    parts = path.split("/")
    if parts[0] in HEAD_MODULES:
        return head_ratio
    if freeze_body:
        return 0.0
    blocks = [int(p[6:]) for p in parts if p.startswith("block_") and p[6:].isdigit()]
    if blocks:
        return layer_decay ** (n_layers - blocks[0])
    if any(p in _EMBEDDINGS for p in parts):
        return layer_decay ** (n_layers + 1)
    return 1.0


def _scale_by_path(scale_of: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiplies each update by `scale_of(its parameter path)`."""

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        def scale(path: tuple, u: Any) -> Any:
            factor = scale_of("/".join(str(getattr(k, "key", k)) for k in path))
            return u * factor if factor != 1.0 else u

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    optim_cfg: Any, total_steps: int, n_layers: int = 0
) -> optax.GradientTransformation:
    """Builds global-norm clipping (if ``clip_norm > 0``) followed by the optimizer.

    All optimizers use ``make_schedule`` and decoupled weight decay (``lr * weight_decay *
    param``, only where ``weight_decay_mask`` is True). ``sgd`` applies ``momentum`` and
    ``nesterov`` to the gradients only. ``adafactor`` is factored RMS scaling with update
    clipping at RMS 1 and an absolute ``lr`` (no parameter-scale multiplication); it ignores
    ``b1``, ``b2`` and ``eps``. ``grad_accum_steps`` is the trainer's business and is ignored.
    Fine-tuning options scale each parameter's update (:func:`lr_scale`): ``head_lr``,
    ``freeze_body`` and ``layer_decay`` (over ``n_layers`` blocks per stack).

    Raises:
        KilnError: on an unknown ``optim.name`` or out-of-range values.
    """
    name = _choice(optim_cfg, "name", OPTIMIZERS)
    schedule = make_schedule(optim_cfg, total_steps)
    wd = float(_num(optim_cfg, "weight_decay", lambda v: v >= 0, "a number >= 0 (0 = off)"))
    clip = float(_num(optim_cfg, "clip_norm", lambda v: v >= 0, "a number >= 0 (0 = off)"))
    decay = optax.add_decayed_weights(wd, mask=weight_decay_mask)
    if name == "adamw":
        beta = "a number in [0, 1), e.g. 0.9"
        tx = optax.adamw(
            schedule,
            b1=float(_num(optim_cfg, "b1", lambda v: 0 <= v < 1, beta)),
            b2=float(_num(optim_cfg, "b2", lambda v: 0 <= v < 1, beta)),
            eps=float(_num(optim_cfg, "eps", lambda v: v > 0, "a number > 0, e.g. 1e-8")),
            weight_decay=wd,
            mask=weight_decay_mask,
        )
    elif name == "sgd":
        momentum = _num(optim_cfg, "momentum", lambda v: 0 <= v < 1, "a number in [0, 1)")
        nesterov = _get(optim_cfg, "nesterov")
        if not isinstance(nesterov, bool):
            raise KilnError(f"optim.nesterov={nesterov!r} is invalid; set it to true or false.")
        trace = optax.trace(decay=float(momentum), nesterov=nesterov)
        tx = optax.chain(trace, decay, optax.scale_by_learning_rate(schedule))
    else:
        rms = optax.scale_by_factored_rms()
        tx = optax.chain(
            rms, optax.clip_by_block_rms(1.0), decay, optax.scale_by_learning_rate(schedule)
        )
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    head_lr = float(optim_cfg.get("head_lr", 0.0) or 0.0)
    lr = float(_get(optim_cfg, "lr"))
    head_ratio = head_lr / lr if head_lr > 0 and lr > 0 else 1.0
    freeze = bool(optim_cfg.get("freeze_body", False))
    layer_decay = float(
        _num(optim_cfg, "layer_decay", lambda v: 0 < v <= 1, "a number in (0, 1]")
        if "layer_decay" in optim_cfg
        else 1.0
    )
    if head_ratio != 1.0 or freeze or layer_decay != 1.0:
        scale_of = functools.partial(
            lr_scale,
            head_ratio=head_ratio,
            freeze_body=freeze,
            layer_decay=layer_decay,
            n_layers=n_layers,
        )
        tx = optax.chain(tx, _scale_by_path(scale_of))
    return tx
