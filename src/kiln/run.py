"""One training run end to end: tokenizer -> data -> model -> restore -> loop -> summary."""

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from kiln import (
    best,
    build,
    checkpoint,
    config_lib,
    decoding,
    divergence,
    evaluation,
    finetuning,
    inputs,
    metrics,
    models,
    restore,
    selection,
    sharding,
    train,
    validation,
)
from kiln import workdir as workdir_lib
from kiln.data import objectives


def to_global(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rows: int) -> train.Batch:
    """Assembles each process's rows into global arrays sharded over the batch axes."""
    target = sharding.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(target, v, (rows, *v.shape[1:]))
        for k, v in local.items()
    }


def evaluate(
    eval_step: Any, params: Any, batches: list, mesh: Any, rows: int
) -> tuple[dict[str, float], list[int]]:
    """Perplexity and token accuracy over fixed batches (sums first, then one division), and a
    classifier's predicted class of every row (empty for language models)."""
    totals, classes = _eval_totals(eval_step, params, batches, mesh, rows)
    return _eval_metrics(totals), classes


def _eval_totals(
    eval_step: Any, params: Any, batches: list, mesh: Any, rows: int
) -> tuple[dict[str, float], list[int]]:
    """The eval step's sums added over `batches` (a loss's own `<name>_sum`/`<name>_count`
    pairs included), and the predicted classes."""
    totals: dict[str, float] = {}
    classes: list[int] = []
    for batch in batches:
        out = jax.device_get(eval_step(params, to_global(batch, mesh, rows)))
        for k, v in out.items():
            if k.endswith(("_sum", "_count")):
                totals[k] = totals.get(k, 0.0) + float(v)
        if "classes" in out:
            classes.extend(np.asarray(out["classes"]).tolist())
    return totals, classes


def _eval_metrics(totals: dict[str, float]) -> dict[str, float]:
    """Loss, perplexity and accuracy per weighted token, plus `<name>` = `<name>_sum` /
    `<name>_count` for a loss's own metrics (ELECTRA's detection loss and accuracy)."""
    tokens = max(totals.get("weight_sum", 0.0), 1.0)
    loss = totals.get("loss_sum", 0.0) / tokens
    result = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": totals.get("correct_sum", 0.0) / tokens,
        "tokens": totals.get("weight_sum", 0.0),
    }
    for key, value in totals.items():
        name = key.removesuffix("_count")
        if key.endswith("_count") and f"{name}_sum" in totals:
            result[name] = totals[f"{name}_sum"] / max(value, 1.0)
    return result


def evaluate_sources(
    eval_step: Any, params: Any, by_source: dict[str, list], mesh: Any, rows: int
) -> dict[str, float]:
    """`evaluate` over a mixture's batches, one pass per source: the metrics of all of them
    (as over the batches concatenated) plus `source/<name>/loss` per source."""
    parts = {
        name: _eval_totals(eval_step, params, batches, mesh, rows)[0]
        for name, batches in by_source.items()
    }
    totals: dict[str, float] = {}
    for part in parts.values():
        for k, v in part.items():
            totals[k] = totals.get(k, 0.0) + v
    per_source = {f"source/{name}/loss": _eval_metrics(t)["loss"] for name, t in parts.items()}
    return _eval_metrics(totals) | per_source


def sample_text(run: "_Run", params: Any) -> str:
    """eval.sample_prompt continued as the decode section says (KV cache, sharded like training)."""
    config, tok = run.config, run.data.tokenizer
    ids = [tok.bos_id, *tok.encode(config.eval.sample_prompt)][: config.model.max_len]
    options = config_lib.decode_options(config.decode, config.seed, config.eval.sample_tokens)
    out = decoding.generate(
        run.built.model,
        params,
        [ids],
        options,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        batch_size=1,
        mesh=run.built.mesh,
    )
    return tok.decode(out[0])


def _validate(run: "_Run", params: Any, step: int = 0) -> dict[str, float]:
    """Validation loss metrics, plus the task metrics when `eval.task_metrics` says so."""
    task = run.data.task
    head = task is not None and finetuning.uses_head(run.config.model.family, task)
    with_task = task is not None and selection.task_metrics_at(run.config.eval, step, head)
    return run.evaluate(params, "validation", with_task=with_task)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by `train_and_evaluate`."""

    config: ml_collections.ConfigDict
    workdir: str
    data: inputs.Data
    built: build.Built
    ckpt: checkpoint.Checkpointer
    writer: metrics.MetricsWriter
    source: restore.Source | None = None
    selector: selection.Selector = dataclasses.field(default_factory=selection.Selector)

    def answering(self) -> finetuning.Answering:
        """How the fine-tuned model answers the task (`finetuning.predictions`)."""
        c = self.config
        return finetuning.Answering(
            family=c.model.family,
            seq_len=c.data.seq_len,
            batch_size=c.data.global_batch_size,
            template=finetuning.template(c.task, self.data.task),
            decode=config_lib.decode_options(c.decode, c.seed, c.task.target_len),
        )

    def evaluate(self, params: Any, split: str, with_task: bool = False) -> dict[str, Any]:
        """Loss metrics of a split; with `with_task`, a fine-tune's task metrics too (one pass
        for a classifier head) and the predictions under the key "predictions"."""
        by_source = self.data.by_source.get(split)
        if by_source and self.data.task is None:
            return evaluate_sources(
                self.built.eval_step,
                params,
                by_source,
                self.built.mesh,
                self.config.data.global_batch_size,
            )
        batches = self.data.validation if split == "validation" else self.data.test
        result, classes = evaluate(
            self.built.eval_step,
            params,
            batches,
            self.built.mesh,
            self.config.data.global_batch_size,
        )
        if self.data.task is None:
            return result
        result["token_accuracy"] = result.pop("accuracy")  # Task metrics carry plain names.
        if with_task:
            scores, preds = finetuning.score(
                self.answering(),
                self.data.task,
                self.data.examples[split],
                self.built.model,
                params,
                self.data.tokenizer,
                classes,
                self.built.mesh,
            )
            result.update(scores, predictions=preds)
        return result


@workdir_lib.locked  # Holds <workdir>/kiln.lock for the whole run: a second run is refused.
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the run described by `config` in `workdir`; returns the summary.
    A config with a `prompting` section trains nothing: it scores its `init_from` run by
    prompting (`kiln.evaluation.run_stage`); `train.steps=0` scores the restored model."""
    if "prompting" in config:
        return evaluation.run_stage(config, workdir)
    mesh_shape = validation.validate(config, jax.device_count(), jax.process_count())
    divergence.Guard.from_config(config.train)  # Its fields checked before any work.
    workdir_lib.prepare(config, workdir)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, workdir_lib.CHECKPOINTS),
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
    )
    writer = None
    try:
        source = None
        if ckpt.latest_step() is None and (config.init_from.workdir or config.init_from.get("hf")):
            source = restore.resolve(config.init_from)
            restore.check_architecture(config.model, source)
        data = inputs.prepare(config, workdir, source)
        classes = finetuning.num_classes(config.model.family, data.task) if data.task else 0
        built = build.build(_buildable(config, data.task), classes)
        metrics.log(f"Mesh (data, fsdp, tensor) = {mesh_shape} over {jax.device_count()} devices")
        writer = metrics.MetricsWriter(workdir)
        run = _Run(config, workdir, data, built, ckpt, writer, source)
        summary = _loop(run)
    finally:
        ckpt.close()  # Waits for an in-flight save: a crash never loses a committed checkpoint.
        if writer is not None:
            writer.close()
    inputs.sync("kiln_run_done")  # No process leaves while another still writes (clean shutdown).
    return summary


def _buildable(config: ml_collections.ConfigDict, task: Any) -> ml_collections.ConfigDict:
    """`config` as `build.build` takes it: `train.steps=1` for an evaluation-only run (steps 0:
    its optimizer and schedule are built but never step), the task head's pooling."""
    pooling = finetuning.head_pooling(config.task.pooling, task)
    if config.train.steps > 0 and pooling == config.task.pooling:
        return config
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.steps = max(config.train.steps, 1)
    config.task.pooling = pooling
    return config


def _loop(run: _Run) -> dict[str, Any]:
    config = run.config
    state = restore.initial_state(
        run.built, run.ckpt, config.init_from, config.seed, run.source, run.data.train_iter
    )
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    metrics.log(f"Model: {config.model.family}, {param_count:,} parameters")
    start = int(state.step)
    last_eval: tuple[int, dict] | None = None  # (step, validation result) of the last eval
    if start == 0:
        last_eval = (0, _validate(run, state.params))  # Reused at the end by steps=0 runs.
        metrics.log_eval(run.writer, 0, "validation", last_eval[1])
    shapes = {k: v.shape for k, v in run.data.validation[0].items()}
    guard = divergence.Guard.from_config(config.train, run.ckpt.loop_state(start) if start else {})
    tracker = metrics.StepMetrics(config, run.writer, start, shapes, guard)
    run.selector = best.selector(config, run.ckpt, start)
    started = time.perf_counter()
    end = (
        config.train.steps
        if config.train.stop_after <= 0
        else min(config.train.stop_after, config.train.steps)
    )
    end = start if run.selector.early_stopped else end  # Resumed after an early stop.
    step = start
    while step < end or tracker.pending is not None:
        try:
            if step == end:
                tracker.flush()  # The last step's metrics (its checkpoint flushed them already).
                continue
            step += 1
            state, evaluated = _advance(run, state, step, end, tracker)
            last_eval = evaluated or last_eval
            end = step if run.selector.early_stopped else end
        except divergence.Diverged as diverged:
            state, step, tracker.guard = divergence.respond(run, diverged, tracker.guard, start)
            tracker.restart(step)
            run.selector = best.selector(config, run.ckpt, step)
            last_eval = None
    run.ckpt.wait()  # The last save committed (or its failure raised) before the summary.
    if end < config.train.steps and not run.selector.early_stopped:
        metrics.log(f"Stopped at step {end} (train.stop_after); re-run the command to continue.")
        return {"step": end}
    seconds = time.perf_counter() - started
    state, last_eval = best.scoring_state(run.built, run.ckpt, run.selector, state, last_eval)
    return _finish(run, state, param_count, seconds, last_eval)


def _advance(
    run: _Run, state: train.TrainState, step: int, end: int, tracker: metrics.StepMetrics
) -> tuple[train.TrainState, tuple[int, dict] | None]:
    """Train step `step`; then the evaluation and the checkpoint due at it, each only after the
    step's metrics passed the divergence check. Returns the state and (step, validation) if
    it evaluated."""
    config = run.config
    batch = to_global(next(run.data.train_iter), run.built.mesh, config.data.global_batch_size)
    state, step_metrics = run.built.train_step(state, batch, tracker.guard.lr_scale)
    tracker.push(step, step_metrics)
    run.ckpt.poll()  # A failed save surfaces here, a step or two after it started.
    evaluated, must_save = None, False
    if step % config.eval.every == 0 or step == config.train.steps:
        tracker.flush()
        evaluated = (step, _validate(run, state.params, step))
        metrics.log_eval(run.writer, step, "validation", evaluated[1])
        must_save = best.observe(run.selector, run.ckpt, step, evaluated[1])
    if must_save or step % config.checkpoint.every == 0 or step in (end, config.train.steps):
        tracker.flush()  # Never save a state that was not checked.
        on_disk = restore.on_disk(run.built, state)
        record = {**tracker.guard.as_record(), **run.selector.as_record()}
        run.ckpt.save(step, on_disk, run.data.train_iter, record)
    return state, evaluated


def _finish(
    run: _Run,
    state: train.TrainState,
    param_count: int,
    seconds: float,
    last_eval: tuple[int, dict] | None,
) -> dict:
    """Final validation and test metrics, an optional greedy sample, summary.json."""
    config = run.config
    step = int(state.step)
    summary: dict[str, Any] = {
        "step": step,
        "parameters": int(param_count),
        "train_seconds_this_session": seconds,
        **run.selector.summary(),  # best_step/metric/value (checkpoint.best_metric)
    }
    task = run.data.task
    predictions: dict[str, list[str]] = {}
    for split in ("validation", "test"):
        reuse = split == "validation" and last_eval is not None and last_eval[0] == step
        if reuse and (task is None or "predictions" in last_eval[1]):
            result = dict(last_eval[1])  # The loop evaluated this very state already.
        else:
            result = run.evaluate(state.params, split, with_task=task is not None)
        predictions[split] = result.pop("predictions", [])
        summary.update({f"{split}/{k}": v for k, v in result.items()})
    if task is not None:
        return _finish_task(run, summary, predictions["test"])
    first = workdir_lib.first_perplexity(run.workdir)
    if first is not None:
        summary["validation/perplexity_at_start"] = first
    if (
        config.eval.sample_prompt
        and models.family_of(run.built.model).layout == objectives.Layout.DECODER
    ):
        summary["sample"] = config.eval.sample_prompt + sample_text(run, state.params)
    workdir_lib.write_summary(run.workdir, summary)
    start = f"{first:.2f} at step 0 -> " if first is not None else ""
    metrics.log(
        f"Done: validation perplexity {start}{summary['validation/perplexity']:.2f} at step"
        f" {summary['step']}; test perplexity {summary['test/perplexity']:.2f}."
        f" Summary: {os.path.join(run.workdir, workdir_lib.SUMMARY)}"
    )
    if "sample" in summary:
        metrics.log(f"Sample ({config.decode.strategy}): {summary['sample']!r}")
    return summary


def _finish_task(run: _Run, summary: dict[str, Any], test_predictions: list[str]) -> dict:
    """A fine-tune's summary.json (task metrics included) and predictions_test.jsonl."""
    task, examples = run.data.task, run.data.examples
    summary["task"] = task.name
    for split in ("validation", "test"):
        summary[f"{split}/examples"] = len(examples[split])
        if task.kind == "generation" and "chrf" in task.metrics:
            baseline = finetuning.copy_baseline(task, examples[split])
            summary.update({f"{split}/copy_input_{k}": v for k, v in baseline.items()})
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, workdir_lib.PREDICTIONS), "w") as f:
            for example, pred in zip(examples["test"], test_predictions):
                row = {"id": example.id, "prediction": pred, "target": example.target}
                f.write(json.dumps(row) + "\n")
    workdir_lib.write_summary(run.workdir, summary)
    shown = ", ".join(f"{m} {summary[f'test/{m}']:.4g}" for m in task.metrics)
    metrics.log(
        f"Done: {task.name} at step {summary['step']}: test {shown} (validation "
        + ", ".join(f"{m} {summary[f'validation/{m}']:.4g}" for m in task.metrics)
        + f"). Summary: {os.path.join(run.workdir, workdir_lib.SUMMARY)}"
    )
    return summary
