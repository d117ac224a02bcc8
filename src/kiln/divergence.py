"""Is training still sane? The host-side half of kiln's divergence check.

The jitted train step returns the loss and the norms of the gradient, the update and the
updated parameters (`train.train_step`); `Guard.check` looks at them one step late, before the
loop evaluates or checkpoints that state, and raises `Diverged` when one is NaN/Inf or, with
`train.max_loss_spike` > 0, when the loss exceeds that multiple of its running mean. The loop then
stops (`train.on_nonfinite=stop`) or rolls back to the last good checkpoint with half the
learning-rate scale (`rollback`, at most `train.max_rollbacks` times per run). The guard's state
(learning-rate scale, rollbacks, running mean) is saved with every checkpoint (`as_record`), so a
resumed run decides exactly as the uninterrupted one would. `respond` carries the policy out.
"""

import dataclasses
import math
import os
from typing import Any

from kiln import integrity, metrics, restore
from kiln import workdir as workdir_lib
from kiln.errors import KilnError, config_error

POLICIES = ("stop", "rollback")
_DECAY = 0.98  # running mean of the loss: exponential, about the last 50 steps
_WARMUP = 10  # finite steps before the spike check starts
# Metric -> the first step whose state it condemns, relative to the step that reported it: the
# loss and gradient of step k are computed from the parameters after step k - 1; the update and
# parameter norms describe the state after step k itself.
_CONDEMNS = {"loss": 1, "grad_norm": 1, "update_norm": 0, "param_norm": 0}


class Diverged(Exception):  # noqa: N818 (a condition the loop handles, not a failure)
    """Step `step` showed divergence (`why`); states from step `suspect_from` on are not kept."""

    def __init__(self, step: int, why: str, suspect_from: int) -> None:
        super().__init__(f"step {step}: {why}")
        self.step, self.why, self.suspect_from = step, why, suspect_from


@dataclasses.dataclass
class Guard:
    """The divergence policy of a run and the state it carries from step to step."""

    on_nonfinite: str = "stop"
    max_loss_spike: float = 0.0
    max_rollbacks: int = 3
    lr_scale: float = 1.0
    rollbacks: int = 0
    loss_mean: float = 0.0  # running mean, bias-corrected by `loss_count`
    loss_count: int = 0

    @classmethod
    def from_config(cls, train_cfg: Any, record: dict[str, Any] | None = None) -> "Guard":
        """The `train` section's policy, with the state of a checkpoint's record (if any)."""
        policy = train_cfg.get("on_nonfinite", "stop")
        if policy not in POLICIES:
            raise config_error(
                "train.on_nonfinite", policy, "is not a policy", "Use 'stop' or 'rollback'."
            )
        spike = train_cfg.get("max_loss_spike", 0.0)
        if (
            isinstance(spike, bool)
            or not isinstance(spike, int | float)
            or not (spike == 0 or (math.isfinite(spike) and spike > 1))
        ):
            raise config_error(
                "train.max_loss_spike",
                spike,
                "is not a loss multiple",
                "Set it to a number > 1 (e.g. 3: a loss 3x its running mean diverged) or 0 (off).",
            )
        limit = train_cfg.get("max_rollbacks", 3)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise config_error(
                "train.max_rollbacks", limit, "is not a count", "Set it to an integer >= 0."
            )
        guard = cls(policy, float(spike), limit)
        for key in ("lr_scale", "rollbacks", "loss_mean", "loss_count"):
            if record and isinstance(record.get(key), int | float):
                setattr(guard, key, type(getattr(guard, key))(record[key]))
        return guard

    def as_record(self) -> dict[str, Any]:
        """What a checkpoint saves of the guard (restored by `from_config`)."""
        keys = ("lr_scale", "rollbacks", "loss_mean", "loss_count")
        return {key: getattr(self, key) for key in keys}

    def check(self, step: int, values: dict[str, float]) -> None:
        """Raises `Diverged` if step `step`'s metrics show divergence; else updates the mean."""
        bad = [k for k in _CONDEMNS if k in values and not math.isfinite(values[k])]
        if bad:
            shown = ", ".join(f"{k} {values[k]}" for k in bad)
            raise Diverged(step, f"non-finite {shown}", step - max(_CONDEMNS[k] for k in bad))
        loss = values["loss"]
        mean = self.loss_mean / (1 - _DECAY**self.loss_count) if self.loss_count else 0.0
        if self.max_loss_spike and self.loss_count >= _WARMUP and loss > self.max_loss_spike * mean:
            raise Diverged(
                step,
                f"loss {loss:.4g} is {loss / mean:.1f}x its running mean {mean:.4g}"
                f" (train.max_loss_spike={self.max_loss_spike:g})",
                step - 1,
            )
        self.loss_mean = _DECAY * self.loss_mean + (1 - _DECAY) * loss
        self.loss_count += 1

    def can_roll_back(self) -> bool:
        return self.on_nonfinite == "rollback" and self.rollbacks < self.max_rollbacks

    def rolled_back(self) -> None:
        """After a rollback: half the learning rate from here on, one rollback fewer left."""
        self.lr_scale *= 0.5
        self.rollbacks += 1


def respond(run: Any, diverged: Diverged, guard: Guard, start: int) -> tuple[Any, int, Guard]:
    """After `diverged` in the loop's `run` (a `run._Run`; this session began at step `start`):
    checkpoints of suspect states are moved aside as `<step>.diverged`; then a KilnError that
    names the last good checkpoint (policy `stop`, or no rollback left), or (state, step, guard)
    to go on from it with half the learning-rate scale and the data position where it is (the
    batches since the checkpoint are skipped)."""
    ckpt = run.ckpt
    ckpt.wait()
    moved = [s for s in ckpt.all_steps() if s >= diverged.suspect_from]
    for bad in moved:
        ckpt.set_aside(bad, integrity.DIVERGED)
    good = max(ckpt.all_steps(), default=None)
    if not guard.can_roll_back() or (good is None and start > 0):
        raise KilnError(_stop_message(run, diverged, good, moved, guard))
    resumed = restore.latest(run.built, ckpt, None, run.config.seed)  # No data_iter: skip batches.
    if resumed is None:  # Diverged before the first checkpoint of a run that began at 0.
        config = run.config
        state = restore.initial_state(
            run.built, ckpt, config.init_from, config.seed, run.source, None
        )
        step = 0
    else:
        step, state = resumed
    after = Guard.from_config(run.config.train, ckpt.loop_state(step))
    after.lr_scale, after.rollbacks = guard.lr_scale / 2, guard.rollbacks + 1
    run.writer.write(step, {f"train/{k}": v for k, v in after.as_record().items()})
    metrics.log(
        f"Divergence at step {diverged.step}: {diverged.why}. Rolled back to"
        f" {f'checkpoint step {step}' if resumed else 'the initial state'} (rollback"
        f" {after.rollbacks} of at most {guard.max_rollbacks}); learning-rate scale now"
        f" {after.lr_scale:g}; the batches of steps {step + 1}-{diverged.step + 1} are"
        f" skipped.{_moved(run.workdir, moved)}"
    )
    return state, step, after


def _moved(workdir: str, moved: list[int]) -> str:
    if not moved:
        return ""
    folder = os.path.join(workdir, workdir_lib.CHECKPOINTS)
    return (
        f" Checkpoints {moved} hold states from after the divergence began; they were moved to"
        f" {folder}/<step>.{integrity.DIVERGED}."
    )


def _stop_message(
    run: Any, diverged: Diverged, good: int | None, moved: list[int], guard: Guard
) -> str:
    """The KilnError text of a run stopped by divergence."""
    why = diverged.why[0].upper() + diverged.why[1:]
    count = guard.rollbacks
    tried = f" after {count} rollback{'s' * (count > 1)}" if count else ""
    folder = os.path.join(run.workdir, workdir_lib.CHECKPOINTS)
    last = (
        f"Last good checkpoint: step {good} ({folder}/{good})"
        if good is not None
        else "No checkpoint from before the divergence exists"
    )
    resume = f"resumes from step {good}" if good is not None else "starts again from step 0"
    return (
        f"{why} at step {diverged.step}; training diverged and the run stopped{tried}. {last}."
        f"{_moved(run.workdir, moved)} Re-running the command {resume}: first lower optim.lr,"
        " set optim.clip_norm, use float32 compute, or set train.on_nonfinite=rollback (now"
        f" {guard.on_nonfinite!r}, at most train.max_rollbacks={guard.max_rollbacks})."
    )
