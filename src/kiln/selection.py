"""Model selection within a run: task metrics at evaluations, the best validation checkpoint
and early stopping.

- `eval.task_metrics`: when a fine-tune's evaluations score the task metrics on the validation
  examples (`task.eval_examples`), besides the loss: `auto` (a head: at every evaluation, from
  the same forward pass; a model that answers in text: at every evaluation after step 0, one
  decoding pass each), `always` (also at step 0), `end` (only the final scoring).
- `checkpoint.best_metric` ("" = off): the validation metric that picks the best checkpoint
  ("loss", "perplexity", "mse": lower is better; any other task metric: higher). A step whose
  evaluation improves it strictly is checkpointed and kept (never removed by `checkpoint.keep`);
  the final validation and test scores come from it, and summary.json records `best_step`,
  `best_metric` and `best_value`.
- `train.early_stop_patience` (0 = off): the run ends after that many evaluations in a row
  without improvement (summary.json: `early_stopped`), scored from the best checkpoint.

The bookkeeping (`Selector`) is saved with every checkpoint (kiln's loop record, beside the
divergence guard's), so a resumed run, after a kill or an early stop, decides exactly as an
uninterrupted one.
"""

import dataclasses
import math
from typing import Any

from kiln import task_metrics
from kiln.errors import config_error

MODES = ("auto", "always", "end")  # eval.task_metrics
LOWER_IS_BETTER = ("loss", "perplexity", "mse")
_LOSS_METRICS = ("loss", "perplexity")  # always in a validation result
_RECORD = ("best_step", "best_value", "evals_since_best", "early_stopped")


def check(checkpoint_cfg: Any, train_cfg: Any, eval_cfg: Any, task_name: str) -> None:
    """The rules of `checkpoint.best_metric`, `train.early_stop_patience`, `eval.task_metrics`
    (config errors naming the key)."""
    mode = eval_cfg.get("task_metrics", "auto")
    if mode not in MODES:
        raise config_error("eval.task_metrics", mode, "is not a mode", f"Use one of {MODES}.")
    metric = checkpoint_cfg.get("best_metric", "")
    valid = _LOSS_METRICS + (
        ("token_accuracy", *task_metrics.METRICS) if task_name else ("accuracy",)
    )
    if metric and metric not in valid:
        why = "is not a validation metric of this run" + ("" if task_name else " (pre-training)")
        raise config_error("checkpoint.best_metric", metric, why, f"Use one of {valid}, or ''.")
    patience = train_cfg.get("early_stop_patience", 0)
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        why = "is not a number of evaluations"
        raise config_error("train.early_stop_patience", patience, why, "Set an integer >= 0.")
    if patience and not metric:
        why = "needs a metric to watch"
        fix = "Set checkpoint.best_metric (e.g. 'loss' or a task metric), or patience 0."
        raise config_error("train.early_stop_patience", patience, why, fix)


def task_metrics_at(eval_cfg: Any, step: int, head: bool) -> bool:
    """Whether the evaluation at `step` scores the task metrics (`eval.task_metrics`); `head`:
    the model answers with a head (the metrics come from the loss pass for free)."""
    mode = eval_cfg.get("task_metrics", "auto")
    return mode == "always" or (mode == "auto" and (head or step > 0))


@dataclasses.dataclass
class Selector:
    """The best validation step so far and the evaluations since (`observe` updates them)."""

    metric: str = ""  # checkpoint.best_metric; "" = off
    patience: int = 0  # train.early_stop_patience; 0 = off
    best_step: int = -1  # -1: no evaluation after step 0 yet
    best_value: float = math.nan
    evals_since_best: int = 0
    early_stopped: bool = False

    @classmethod
    def from_config(
        cls, checkpoint_cfg: Any, train_cfg: Any, record: dict[str, Any] | None = None
    ) -> "Selector":
        """The policy of the config sections, with the state of a checkpoint's loop record."""
        selector = cls(
            checkpoint_cfg.get("best_metric", ""), train_cfg.get("early_stop_patience", 0)
        )
        for key in _RECORD:
            if record and key in record:
                setattr(selector, key, type(getattr(selector, key))(record[key]))
        return selector

    def better(self, value: float) -> bool:
        """Whether `value` improves strictly on the best (a NaN never does)."""
        if math.isnan(value):
            return False
        if self.best_step < 0:
            return True
        lower = self.metric in LOWER_IS_BETTER
        return value < self.best_value if lower else value > self.best_value

    def observe(self, step: int, result: dict[str, Any]) -> bool:
        """Takes the validation `result` of `step` (> 0); True when that state must be
        checkpointed: it is the new best, or the run stops early at it."""
        if not self.metric or step <= 0:
            return False
        if self.metric not in result:
            raise config_error(
                "checkpoint.best_metric",
                self.metric,
                "is not computed by this run's evaluations",
                f"Use one of {sorted(k for k in result if k != 'predictions')}, or set"
                " eval.task_metrics='auto' so that task metrics are scored at evaluations.",
            )
        value = float(result[self.metric])
        if self.better(value):
            self.best_step, self.best_value, self.evals_since_best = step, value, 0
            return True
        self.evals_since_best += 1
        self.early_stopped = bool(self.patience) and self.evals_since_best >= self.patience
        return self.early_stopped

    def kept(self) -> set[int]:
        """The steps `checkpoint.Checkpointer.protect` must keep."""
        return {self.best_step} if self.metric and self.best_step > 0 else set()

    def as_record(self) -> dict[str, Any]:
        """What a checkpoint's loop record holds of it (read back by `from_config`)."""
        if not self.metric:
            return {}
        return {key: getattr(self, key) for key in _RECORD}

    def summary(self) -> dict[str, Any]:
        """summary.json's fields: the best step, metric and value; whether it stopped early."""
        if not self.metric or self.best_step < 0:
            return {}
        out = {"best_step": self.best_step, "best_metric": self.metric}
        out["best_value"] = self.best_value
        if self.early_stopped:
            out["early_stopped"] = True
        return out
