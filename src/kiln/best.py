"""The loop's side of model selection (`kiln.selection`): a run's selector, restored from its
checkpoint's record and kept in step with what the checkpointer keeps, and the parameters the
final scoring uses (the best checkpoint's when `checkpoint.best_metric` is set)."""

from typing import Any

from kiln import checkpoint, metrics, restore, selection, train


def selector(config: Any, ckpt: checkpoint.Checkpointer, step: int) -> selection.Selector:
    """The selector of a run at `step` (0: fresh; else from that checkpoint's loop record);
    its best step is protected from `checkpoint.keep`."""
    record = ckpt.loop_state(step) if step else {}
    chosen = selection.Selector.from_config(config.checkpoint, config.train, record)
    ckpt.protect(chosen.kept())
    return chosen


def observe(
    chosen: selection.Selector, ckpt: checkpoint.Checkpointer, step: int, result: dict
) -> bool:
    """`Selector.observe`, logged; True when `step` must be checkpointed (a new best, which
    is then protected, or an early stop)."""
    must_save = chosen.observe(step, result)
    ckpt.protect(chosen.kept())
    if chosen.early_stopped:
        metrics.log(
            f"Early stop at step {step}: validation {chosen.metric} has not improved for"
            f" {chosen.evals_since_best} evaluations (train.early_stop_patience); best"
            f" {chosen.best_value:.4g} at step {chosen.best_step}."
        )
    return must_save


def scoring_state(
    built: Any,
    ckpt: checkpoint.Checkpointer,
    chosen: selection.Selector,
    state: train.TrainState,
    last_eval: tuple[int, dict] | None,
) -> tuple[train.TrainState, tuple[int, dict] | None]:
    """(`state` with the best checkpoint's parameters, None) when the best step is not the
    last one; else (`state`, `last_eval`) unchanged. The step counter stays the last step."""
    if not chosen.metric or chosen.best_step < 0 or chosen.best_step == int(state.step):
        return state, last_eval
    ckpt.wait()
    target = train.on_disk(checkpoint.abstract_like(built.abstract, built.shardings))
    best = restore.from_disk(built, ckpt.restore(chosen.best_step, target))
    metrics.log(
        f"Scoring the best checkpoint: step {chosen.best_step} (validation {chosen.metric}"
        f" {chosen.best_value:.4g}; checkpoint.best_metric)"
    )
    return state.replace(params=best.params), None
