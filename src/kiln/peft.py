"""Parameter-efficient fine-tuning: LoRA adapters and prompt tuning, set by the `finetune`
section. Which parameters a run trains, and the base model a run adapts.

The model holds the adapters in its own parameter tree (`lora_a`/`lora_b` beside a kernel,
`soft_prompt/embedding`, see `kiln.models.adapters`). A `Partition` splits that tree into the
trainable part (adapters, soft prompt, the task head) and the frozen base: the train step
differentiates and updates only the first, the optimizer state covers only it, and a
checkpoint holds only it, with a pointer to the base (`BASE`, in the workdir) that restoring
follows (`kiln.restore`).
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from kiln import integrity
from kiln.errors import KilnError, config_error
from kiln.models.adapters import LORA_PARAMS, PROMPT
from kiln.optim import HEAD_MODULES

BASE = "peft_base.json"  # in a PEFT run's workdir: the base model its checkpoints adapt
PROMPT_INITS = ("vocab", "random")
# The default `finetune.lora.targets`: every attention projection and MLP kernel.
DEFAULT_TARGETS = r".*(attn|mlp)/(query|key|value|out|wi|wi_0|wi_1|wo)/kernel"


@dataclasses.dataclass(frozen=True)
class Spec:
    """The `finetune` section: LoRA (rank 0 = off) and prompt tuning (length 0 = off)."""

    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = DEFAULT_TARGETS
    prompt_length: int = 0
    prompt_init: str = "vocab"

    @property
    def enabled(self) -> bool:
        """Whether the run trains adapters (and its head) only, its base frozen."""
        return self.lora_rank > 0 or self.prompt_length > 0

    def model_fields(self) -> dict[str, Any]:
        """The layer config's fields (`models.build_model(..., peft=...)`)."""
        if not self.enabled:
            return {}
        return {
            "lora_rank": self.lora_rank,
            "lora_alpha": float(self.lora_alpha),
            "lora_dropout": float(self.lora_dropout),
            "lora_targets": self.lora_targets,
            "prompt_length": self.prompt_length,
        }


def spec(config: Any) -> Spec:
    """The `Spec` of a run config (a config without a `finetune` section: off)."""
    f = config.get("finetune")
    if f is None:
        return Spec()
    lora, prompt = f.lora, f.prompt_tuning
    return Spec(lora.rank, lora.alpha, lora.dropout, lora.targets, prompt.length, prompt.init)


def check(config: Any) -> Spec:
    """The `finetune` section's rules (run by `validation.validate`); returns its `Spec`."""
    s = spec(config)
    for key, value in (("lora.rank", s.lora_rank), ("prompt_tuning.length", s.prompt_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            why = "must be an integer >= 0"
            raise config_error(f"finetune.{key}", value, why, "Use 0 (off) or e.g. 8.")
    if s.lora_rank:
        if not s.lora_alpha > 0:
            why = "must be > 0 (the adapters are scaled by alpha / rank)"
            raise config_error("finetune.lora.alpha", s.lora_alpha, why, "Use e.g. 16.")
        if not 0 <= s.lora_dropout < 1:
            why = "must be in [0, 1)"
            raise config_error("finetune.lora.dropout", s.lora_dropout, why, "Use e.g. 0.05.")
        try:
            re.compile(s.lora_targets)
        except re.error as e:
            why = f"is not a valid regex ({e})"
            raise config_error(
                "finetune.lora.targets", s.lora_targets, why, "Fix the regex."
            ) from None
    if s.prompt_length:
        if s.prompt_init not in PROMPT_INITS:
            why, fix = "is unknown", f"Use one of {list(PROMPT_INITS)}."
            raise config_error("finetune.prompt_tuning.init", s.prompt_init, why, fix)
        room = config.model.max_len - config.data.seq_len
        if s.prompt_length > room:
            why = (
                f"does not fit: data.seq_len={config.data.seq_len} + the prompt exceeds"
                f" model.max_len={config.model.max_len}"
            )
            fix = f"Use a length <= {max(room, 0)}, or lower data.seq_len."
            raise config_error("finetune.prompt_tuning.length", s.prompt_length, why, fix)
    if s.enabled and config.init_from.load == "state":
        why = "carries a full model's optimizer state, which a PEFT run does not train"
        fix = "Use init_from.load='params'."
        raise config_error("init_from.load", "state", why, fix)
    return s


def is_trainable(path: str) -> bool:
    """Whether a PEFT run trains the parameter at `path` ("block_0/attn/query/lora_a"):
    LoRA adapters, the soft prompt and the task heads (new, so trained fully)."""
    parts = path.split("/")
    return parts[-1] in LORA_PARAMS or parts[0] in (PROMPT, *HEAD_MODULES)


@dataclasses.dataclass(frozen=True)
class Partition:
    """Splits a parameter tree (arrays, shapes or shardings) into (trainable, frozen).

    Off (full fine-tuning), everything is trainable and the frozen part is empty."""

    on: bool = False

    def split(self, params: Any) -> tuple[Any, Any]:
        if not self.on:
            return params, {}
        flat = traverse_util.flatten_dict(params, sep="/")
        trainable = {k: v for k, v in flat.items() if is_trainable(k)}
        frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
        return _nest(trainable), _nest(frozen)

    def trainable(self, params: Any) -> Any:
        return self.split(params)[0]

    def merge(self, trainable: Any, frozen: Any) -> Any:
        """The inverse of `split`."""
        if not self.on:
            return trainable
        flat = traverse_util.flatten_dict(frozen, sep="/")
        flat.update(traverse_util.flatten_dict(trainable, sep="/"))
        return _nest(flat)


FULL = Partition()  # full fine-tuning (and pre-training): every parameter trains


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    return traverse_util.unflatten_dict(flat, sep="/") if flat else {}


def check_targets(s: Spec, params: Any) -> None:
    """Raises unless LoRA (if on) found kernels to adapt in `params` (abstract, per layer)."""
    if not s.lora_rank:
        return
    paths = list(traverse_util.flatten_dict(params, sep="/"))
    if not any(p.rsplit("/", 1)[-1] == "lora_a" for p in paths):
        kernels = [p for p in paths if p.endswith("/kernel")]
        why = "matches no projection kernel of the model"
        fix = f"Match paths like {kernels[:6]} (fully, as re.fullmatch does)."
        raise config_error("finetune.lora.targets", s.lora_targets, why, fix)


def count(tree: Any) -> int:
    """Number of parameters in a tree of arrays or shapes."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def init_prompt(s: Spec, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """`params` (per layer) with the soft prompt set as `s.prompt_init` says: "vocab" copies the
    embeddings of random tokens (of the loaded base), "random" keeps the fresh init."""
    if not s.prompt_length or s.prompt_init != "vocab":
        return params
    table = params["token_embed"]["embedding"]
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(table.shape[0], size=s.prompt_length, replace=False))
    prompt = jax.device_put(table[ids], params[PROMPT]["embedding"].sharding)
    return {**params, PROMPT: {"embedding": prompt.astype(params[PROMPT]["embedding"].dtype)}}


def fingerprint(path: str) -> str:
    """What identifies a base's bytes: a kiln checkpoint folder's checksum record, or the
    sha256 of a Hugging Face directory's weight files."""
    record = integrity.read_record(path) if os.path.isdir(path) else None
    digest = hashlib.sha256()
    if record is not None:
        digest.update(json.dumps(record["files"], sort_keys=True).encode())
    else:
        for name in sorted(os.listdir(path)):
            if name.endswith((".safetensors", ".bin", ".msgpack")):
                with open(os.path.join(path, name), "rb") as f:
                    digest.update(name.encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def write_base(workdir: str, base: dict[str, Any]) -> None:
    """Records the base a PEFT run adapts (`BASE`): source workdir ("" = scratch), step,
    whether it is a Hugging Face import, init_from.skip, and its `fingerprint`."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, BASE)
    with open(path + ".tmp", "w") as f:
        json.dump(base, f, indent=1)
    os.replace(path + ".tmp", path)


def read_base(workdir: str) -> dict[str, Any]:
    """The base pointer of the PEFT run in `workdir`."""
    path = os.path.join(workdir, BASE)
    if not os.path.exists(path):
        raise KilnError(
            f"{workdir} is a PEFT run (finetune section) but has no {BASE}, the pointer to the"
            " base model its checkpoints adapt. Restore the file, or start a new workdir."
        )
    with open(path) as f:
        return json.load(f)
