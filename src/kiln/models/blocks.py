"""The transformer block and how a stack of blocks runs: remat, scan over layers, and the
stacked parameter layout that scan needs.

A block is called as `block(x, args, mode)`: `args` a NamedTuple of the arrays every layer of
the stack reads (`BlockArgs`; T5's decoder has its own), `mode` a `BlockMode` of Python values.
"""

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kiln.errors import KilnError
from kiln.models import attention, layers
from kiln.models.layers import TransformerConfig


class BlockArgs(NamedTuple):
    """The arrays a `TransformerBlock` reads besides its input, the same for every layer."""

    bias: jax.Array  # Additive float32 attention bias, broadcastable to [B, H, L, S].
    positions_BL: jax.Array | None = None  # If given, rope is applied with these positions.
    cache_index: jax.Array | None = None  # Decoding: int32 scalar, this call's first slot.


@dataclasses.dataclass(frozen=True)
class BlockMode:
    """How the blocks of a stack run: Python values the blocks branch on, so under `nn.remat`
    the block's one static argument (see `rematerialized`), hence frozen and hashable.

    Attributes:
      deterministic: disables dropout.
      decode: self-attention reads and extends the KV cache (see `attention.Attention`).
    """

    deterministic: bool = True
    decode: bool = False


# Position of `mode` in a block's __call__(self, x, args, mode); self is 0.
_MODE_ARGNUM = 3


def rematerialized(block: type[nn.Module], cfg: TransformerConfig) -> type[nn.Module]:
    """`block` (called as `block(x, args, mode)`) under `cfg.remat`, itself for "none".

    `mode` is its one static argument; it must be passed positionally, since nn.remat traces
    keyword arguments. Parameter names are unchanged.
    """
    if cfg.remat == "none":
        return block
    return nn.remat(block, policy=layers.REMAT_POLICIES[cfg.remat], static_argnums=(_MODE_ARGNUM,))


class TransformerBlock(nn.Module):
    """Self-attention then MLP, each a residual branch; pre-LN or post-LN per the config.

    pre: x + f(norm(x)) (norms `pre_attn_norm`, `pre_mlp_norm`); post: norm(x + f(x)) (norms
    `post_attn_norm`, `post_mlp_norm`), so a checkpoint's tree tells which order it was trained in.
    """

    config: TransformerConfig

    @nn.compact
    def __call__(self, x_BLD: jax.Array, args: BlockArgs, mode: BlockMode) -> jax.Array:
        """Returns the block's output [B, L, D]. Pass `mode` positionally (see `rematerialized`).

        `args.bias` covers [B, H, L, S_max], the cache slots, when decoding.
        """
        cfg = self.config
        pre = cfg.norm_position == "pre"

        def norm(x_BLD, sublayer):
            return layers.make_norm(cfg, f"{cfg.norm_position}_{sublayer}_norm")(x_BLD)

        def dropout(h_BLD):
            return nn.Dropout(cfg.dropout)(h_BLD, deterministic=mode.deterministic)

        x_BLD = nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)
        h_BLD = norm(x_BLD, "attn") if pre else x_BLD
        h_BLD = attention.Attention(cfg, name="attn")(
            h_BLD,
            h_BLD,
            args.bias,
            args.positions_BL,
            args.positions_BL,
            deterministic=mode.deterministic,
            decode=mode.decode,
            cache_index=args.cache_index,
        )
        x_BLD = x_BLD + dropout(h_BLD)
        x_BLD = x_BLD if pre else norm(x_BLD, "attn")
        h_BLD = norm(x_BLD, "mlp") if pre else x_BLD
        h_BLD = layers.Mlp(cfg, name="mlp")(h_BLD, deterministic=mode.deterministic)
        x_BLD = x_BLD + dropout(h_BLD)
        x_BLD = x_BLD if pre else norm(x_BLD, "mlp")
        return nn.with_logical_constraint(x_BLD, layers.ACT_NAMES)


# Stacked and per-layer parameters.
#
# lax.scan over layers needs each parameter of a stack as one array with a leading layer axis.
# A `model.scan_layers` run keeps its train state in that layout (`train.init_state`), so the
# optimizer updates one leaf per stack and no step copies the blocks' parameters and optimizer
# state into it. Checkpoints stay per-layer (`block_0`, `block_1`, ...; `train.on_disk`): the
# saved tree must not depend on a performance flag, so runs with and without scan_layers, and
# decoding, which needs per-layer parameters for its per-layer caches, read each other's.

STACKED = "blocks"  # Under scan_layers, a stack's parameters held layer-major in one entry.


def _is_block(key: Any) -> bool:
    return isinstance(key, str) and key.startswith("block_") and key[6:].isdigit()


def _stack_leaves(*leaves: Any) -> Any:
    first = leaves[0]
    if isinstance(first, nn.Partitioned):
        value = _stack_leaves(*(leaf.value for leaf in leaves))
        return first.replace(value=value, names=(None, *first.names))
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if isinstance(first, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec(None, *first.spec))
    return jnp.stack(leaves)


def _layer_of(leaf: Any, i: int) -> Any:
    if isinstance(leaf, nn.Partitioned):
        return leaf.replace(value=_layer_of(leaf.value, i), names=leaf.names[1:])
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding and _layer_of(leaf.sharding, i)
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    if isinstance(leaf, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(leaf.mesh, jax.sharding.PartitionSpec(*leaf.spec[1:]))
    return leaf[i]


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nn.Partitioned | jax.ShapeDtypeStruct | jax.sharding.Sharding)


def _map_dicts(fn: Any, tree: Any) -> Any:
    """`fn` applied to every dict of `tree`, innermost first, through tuples, NamedTuples
    (optax states) and lists; other leaves unchanged."""
    if isinstance(tree, dict):
        return fn({k: _map_dicts(fn, v) for k, v in tree.items()})
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_dicts(fn, x) for x in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_map_dicts(fn, x) for x in tree)
    return tree


def _stack_dict(tree: dict) -> dict:
    out = {k: v for k, v in tree.items() if not _is_block(k)}
    blocks = [tree[f"block_{i}"] for i in range(sum(map(_is_block, tree)))]
    if blocks:
        out[STACKED] = jax.tree.map(_stack_leaves, *blocks, is_leaf=_is_leaf)
    return out


def _unstack_dict(tree: dict) -> dict:
    out = {k: v for k, v in tree.items() if k != STACKED}
    if STACKED in tree:
        first = jax.tree.leaves(tree[STACKED], is_leaf=_is_leaf)[0]
        count = (first.value if isinstance(first, nn.Partitioned) else first).shape[0]
        for i in range(count):
            layer_i = functools.partial(_layer_of, i=i)
            out[f"block_{i}"] = jax.tree.map(layer_i, tree[STACKED], is_leaf=_is_leaf)
    return out


def stack_blocks(tree: Any) -> Any:
    """`tree` with every dict's block_0 .. block_{n-1} replaced by one `STACKED` entry whose
    leaves stack theirs on a new leading axis (unsharded, unnamed). Works on parameters,
    optimizer states, abstract shapes, boxes and shardings."""
    return _map_dicts(_stack_dict, tree)


def unstack_blocks(tree: Any) -> Any:
    """The inverse of `stack_blocks`: per-layer block_i entries again (a no-op on trees that
    hold none stacked)."""
    return _map_dicts(_unstack_dict, tree)


def apply_blocks(
    parent: nn.Module, blocks: Sequence[nn.Module], x: jax.Array, args: tuple, mode: BlockMode
) -> jax.Array:
    """`x` through `blocks` (children of `parent`, one class) in order, as `block(x, args, mode)`.

    With `config.scan_layers`, one `lax.scan` over the blocks' parameters (one layer traced and
    compiled, whatever the depth). They are used as held when the train state keeps them
    stacked (`STACKED`, see `train.init_state`), else stacked inside the step.
    With dropout active, layer i draws its masks from key i of a split of one `parent` key,
    scanned or not, so both run the same function.
    Decoding runs the blocks one by one, without either: each layer has its own cache
    variables, and its parameters must be per-layer (`unstack_blocks`).
    """
    cfg = blocks[0].config
    scan = cfg.scan_layers and not mode.decode
    dropout = cfg.dropout > 0 or cfg.lora_dropout > 0  # LoRA's dropout: `layers.Dense`.
    dropout_rng = dropout and not mode.deterministic and not mode.decode
    if parent.is_initializing():
        for block in blocks:
            x = block(x, args, mode)
        return x
    params = nn.meta.unbox(parent.variables["params"])
    if STACKED in params and not scan:
        raise KilnError(
            f"{parent.name or type(parent).__name__}: its blocks' parameters are stacked (held"
            " for model.scan_layers); unstack them (kiln.models.blocks.unstack_blocks) to run"
            " the blocks one by one, as decoding does."
        )
    if not (scan or dropout_rng):
        for block in blocks:
            x = block(x, args, mode)
        return x
    keys = jax.random.split(parent.make_rng("dropout"), len(blocks)) if dropout_rng else None
    layer = blocks[0].clone(parent=None, name=None)

    def apply_layer(x, params_and_key):
        layer_params, key = params_and_key
        rngs = {} if key is None else {"dropout": key}
        return layer.apply({"params": layer_params}, x, args, mode, rngs=rngs), None

    if scan:
        if STACKED not in params:  # Per-layer parameters (not from a train state): stack here.
            params = _stack_dict(params)
        return jax.lax.scan(apply_layer, x, (params[STACKED], keys))[0]
    for i, block in enumerate(blocks):
        x, _ = apply_layer(x, (params[block.name], None if keys is None else keys[i]))
    return x
