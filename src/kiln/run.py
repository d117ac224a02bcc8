"""One training run end to end: tokenizer -> data -> model -> restore -> loop -> summary."""

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kiln import (
    checkpoint,
    config_lib,
    decoding,
    finetuning,
    flops,
    init_from,
    metrics,
    models,
    optim,
    sharding,
    train,
)
from kiln.data import corpus, objectives, pipeline
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError

TOKENIZER_FILE = "tokenizer.model"
# Sections that define what a run computes: a resumed run may change anything else (steps,
# learning rate, evaluation, checkpointing, mesh) but not these.
RUN_IDENTITY = ("seed", "model", "tokenizer", "data", "objective", "task")
# Model fields that change how, not what, the run computes: a resumed run may change them.
HOW_NOT_WHAT = ("remat", "scan_layers")


@dataclasses.dataclass
class Data:
    """Everything the loop reads: the tokenizer, the train iterator and fixed eval batches."""

    tokenizer: tokenizer_lib.Tokenizer
    train_iter: Any
    validation: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    task: finetuning.TaskData | None = None  # set when fine-tuning on a labeled task


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Creates the workdir and writes config.json; a resumed run must keep its model section."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        old, new = config_lib.load_json(path).to_dict(), config_lib.to_dict(config)
        for run_config in (old, new):
            for key in HOW_NOT_WHAT:
                run_config.get("model", {}).pop(key, None)
        changed = config_lib.diff(
            {k: old.get(k) for k in RUN_IDENTITY}, {k: new.get(k) for k in RUN_IDENTITY}
        )
        if changed:
            raise KilnError(
                f"{workdir} holds a different run; differing keys: {changed}. Use a new"
                " --workdir, or restore those values to resume the existing run."
            )
    if jax.process_index() == 0:
        config_lib.save_json(config, path)


def prepare_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_documents: list[str],
    source_run: init_from.Source | None = None,
) -> tokenizer_lib.Tokenizer:
    """Loads the workdir's tokenizer, else copies the `init_from` run's or `tokenizer.path`,
    else trains one on `train_documents`."""
    dest = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(dest) and jax.process_index() == 0:
        source = config.tokenizer.path
        if source_run is not None:
            theirs = source_run.tokenizer_path
            if source and not _same_file(_tokenizer_file(source), theirs):
                raise KilnError(
                    f"tokenizer.path={source!r} is not the tokenizer of the init_from run"
                    f" ({theirs}): a fine-tune must use the vocabulary it was pre-trained with."
                    ' Set tokenizer.path="" to take it from the init_from run.'
                )
            source = theirs
        if source:
            source = _tokenizer_file(source)
            if not os.path.exists(source):
                raise KilnError(
                    f"tokenizer.path={config.tokenizer.path!r}: no {TOKENIZER_FILE} there. Point it"
                    ' at a tokenizer.model file or a finished run\'s workdir, or set it to ""'
                    " to train a new tokenizer."
                )
            shutil.copyfile(source, dest)
        else:
            metrics.log(f"Training a {config.tokenizer.model_type} tokenizer ...")
            tokenizer_lib.train_tokenizer(
                train_documents[: config.tokenizer.max_sentences],
                dest,
                vocab_size=config.model.vocab_size,
                model_type=config.tokenizer.model_type,
                seed=config.seed,
            )
    _sync("tokenizer")
    tok = tokenizer_lib.load_tokenizer(dest)
    if tok.vocab_size != config.model.vocab_size:
        raise KilnError(
            f"model.vocab_size={config.model.vocab_size} but {dest} has {tok.vocab_size} pieces."
            f" Set --config.model.vocab_size={tok.vocab_size}."
        )
    return tok


def _tokenizer_file(path: str) -> str:
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


def _same_file(a: str, b: str) -> bool:
    if not (os.path.exists(a) and os.path.exists(b)):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def prepare_task_data(
    config: ml_collections.ConfigDict, workdir: str, source_run: init_from.Source | None
) -> Data:
    """Fine-tuning data: the labeled task's train stream and eval batches."""
    task = finetuning.load(config)
    texts = [f"{e.input}\n{e.target}" for e in task.splits["train"]]
    tok = prepare_tokenizer(config, workdir, texts, source_run)
    prepared = finetuning.prepare(config, task, tok)
    return Data(tok, prepared.train_iter, prepared.validation, prepared.test, prepared)


def make_objective(
    config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer
) -> objectives.Objective:
    """The pre-training objective the `objective` section describes."""
    o = config.objective
    return objectives.make_objective(
        o.name,
        config.model.family,
        tok,
        config.data.seq_len,
        mask_rate=o.mask_rate,
        whole_word=o.whole_word,
        noise_density=o.noise_density,
        mean_noise_span_length=o.mean_noise_span_length,
    )


def prepare_data(
    config: ml_collections.ConfigDict, workdir: str, source_run: init_from.Source | None = None
) -> Data:
    if config.task.name:
        return prepare_task_data(config, workdir, source_run)
    d = config.data
    data_dir = d.data_dir or None
    train_docs = corpus.read_documents(d.corpus, "train", data_dir)
    tok = prepare_tokenizer(config, workdir, train_docs, source_run)
    objective = make_objective(config, tok)
    dataset = pipeline.make_train_dataset(
        train_docs,
        tok,
        seq_len=d.seq_len,
        global_batch_size=d.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        objective=objective,
        streams=d.streams,
    )

    def eval_batches(split: str) -> list[dict[str, np.ndarray]]:
        docs = corpus.read_documents(d.corpus, split, data_dir)
        # A fixed sample of the split (seed 0 for every run, so runs compare on the same text);
        # in corpus order the first batches would hold one source only.
        docs = [docs[i] for i in np.random.default_rng(0).permutation(len(docs))]
        batches = pipeline.make_eval_batches(
            docs,
            tok,
            seq_len=d.seq_len,
            batch_size=d.global_batch_size,
            max_batches=config.eval.batches,
            objective=objective,
        )
        return [
            pipeline.process_slice(b, jax.process_index(), jax.process_count()) for b in batches
        ]

    return Data(tok, iter(dataset), eval_batches("validation"), eval_batches("test"))


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
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "weight_sum": 0.0}
    classes: list[int] = []
    for batch in batches:
        out = jax.device_get(eval_step(params, to_global(batch, mesh, rows)))
        totals = {k: totals[k] + float(out[k]) for k in totals}
        if "classes" in out:
            classes.extend(np.asarray(out["classes"]).tolist())
    tokens = max(totals["weight_sum"], 1.0)
    loss = totals["loss_sum"] / tokens
    result = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 80.0)),
        "accuracy": totals["correct_sum"] / tokens,
        "tokens": totals["weight_sum"],
    }
    return result, classes


def sample_text(run: "_Run", params: Any) -> str:
    """eval.sample_prompt continued as the decode section says (KV cache, sharded like training)."""
    config, tok = run.config, run.data.tokenizer
    ids = [tok.bos_id, *tok.encode(config.eval.sample_prompt)][: config.model.max_len]
    options = config_lib.decode_options(config, config.eval.sample_tokens)
    out = decoding.generate(
        run.model,
        params,
        [ids],
        options,
        eos_id=tok.eos_id,
        bos_id=tok.bos_id,
        batch_size=1,
        mesh=run.mesh,
    )
    return tok.decode(out[0])


class _StepMetrics:
    """Pulls a step's metrics one step late, checks them, and logs at `log_every`."""

    def __init__(
        self, config: Any, writer: metrics.MetricsWriter, start_step: int, shapes: dict
    ) -> None:
        self.config, self.writer = config, writer
        self.tokens_per_step, self.flops_per_step = flops.step_cost(
            config.model.to_dict(), shapes, config.data.global_batch_size
        )
        self.peak = flops.peak_flops_per_device(config.model.dtype) * jax.device_count()
        self.pending: tuple[int, dict] | None = None
        self.mark = (start_step, None)  # (step, time) of the last throughput measurement
        self.start = (start_step, None)
        self.last_good_checkpoint: int | None = None

    def push(self, step: int, device_metrics: dict) -> None:
        self.flush()
        self.pending = (step, device_metrics)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, device_metrics = self.pending
        self.pending = None
        values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
            where = (
                f"step {self.last_good_checkpoint} in checkpoints/"
                if self.last_good_checkpoint is not None
                else "none saved yet"
            )
            raise KilnError(
                f"Non-finite loss ({values['loss']}) or gradient norm ({values['grad_norm']}) at"
                f" step {step}; the run stopped. Last good checkpoint: {where}. Lower optim.lr,"
                " set optim.clip_norm, or use float32 compute, then re-run to resume."
            )
        now = time.perf_counter()
        log_now = step % self.config.train.log_every == 0 or step == self.config.train.steps
        eta = float("nan")
        if self.mark[1] is None:  # The first step includes compilation: time from its end.
            self.mark = self.start = (step, now)
        elif log_now:
            seconds = now - self.mark[1]
            tokens_per_sec = (step - self.mark[0]) * self.tokens_per_step / max(seconds, 1e-9)
            values["tokens_per_sec"] = tokens_per_sec
            values["mfu"] = tokens_per_sec / self.tokens_per_step * self.flops_per_step / self.peak
            self.mark = (step, now)
            per_step = (now - self.start[1]) / max(step - self.start[0], 1)
            eta = per_step * (self.config.train.steps - step)
        if log_now:
            metrics.log(metrics.progress_line(step, self.config.train.steps, values, eta))
            self.writer.write(step, {f"train/{k}": v for k, v in values.items()})


def _log_eval(writer: metrics.MetricsWriter, step: int, split: str, result: dict) -> None:
    result = {k: v for k, v in result.items() if k != "predictions"}
    writer.write(step, {f"{split}/{k}": v for k, v in result.items()})
    shown = [f"loss {result['loss']:.4f}", f"perplexity {result['perplexity']:.2f}"]
    shown += [f"{k} {v:.3f}" for k, v in result.items() if k not in _NOT_SHOWN]
    metrics.log(f"step {step} | {split} " + " | ".join(shown))


_NOT_SHOWN = ("loss", "perplexity", "tokens")


def _validate(run: "_Run", params: Any) -> dict[str, float]:
    """Validation loss metrics, plus the task metrics when they are cheap (a classifier head)."""
    task = run.data.task
    cheap = task is not None and finetuning.uses_head(run.config, task.task)
    return run.evaluate(params, "validation", with_task=cheap)


@dataclasses.dataclass
class _Run:
    """What the loop needs, built once by `train_and_evaluate`."""

    config: ml_collections.ConfigDict
    workdir: str
    data: Data
    model: Any
    optimizer: Any
    mesh: jax.sharding.Mesh
    abstract: train.TrainState
    shardings: train.TrainState
    train_step: Any
    eval_step: Any
    ckpt: checkpoint.Checkpointer
    writer: metrics.MetricsWriter
    source: init_from.Source | None = None

    def evaluate(self, params: Any, split: str, with_task: bool = False) -> dict[str, Any]:
        """Loss metrics of a split; with `with_task`, a fine-tune's task metrics too (one pass
        for a classifier head) and the predictions under the key "predictions"."""
        batches = self.data.validation if split == "validation" else self.data.test
        result, classes = evaluate(
            self.eval_step, params, batches, self.mesh, self.config.data.global_batch_size
        )
        if self.data.task is None:
            return result
        result["token_accuracy"] = result.pop("accuracy")  # Task metrics carry plain names.
        if with_task:
            scores, preds = finetuning.score(
                self.config,
                self.data.task,
                self.model,
                params,
                self.data.tokenizer,
                split,
                classes,
                self.mesh,
            )
            result.update(scores, predictions=preds)
        return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the run described by `config` in `workdir`; returns the summary."""
    mesh_shape = config_lib.validate(config, jax.device_count(), jax.process_count())
    prepare_workdir(config, workdir)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        keep=config.checkpoint.keep,
        keep_every=config.checkpoint.keep_every,
    )
    writer = None
    try:
        source = None
        if ckpt.latest_step() is None and config.init_from.workdir:
            source = init_from.resolve(config.init_from)
            init_from.check_architecture(config.model, source)
        data = prepare_data(config, workdir, source)
        classes = finetuning.num_classes(config, data.task.task) if data.task else 0
        model = models.build_model(config.model, classes, config.task.pooling)
        schedule = optim.make_schedule(config.optim, config.train.steps)
        optimizer = optim.make_optimizer(config.optim, config.train.steps, config.model.n_layers)
        mesh = sharding.make_mesh(config.mesh)
        metrics.log(f"Mesh (data, fsdp, tensor) = {mesh_shape} over {jax.device_count()} devices")
        abstract, shardings = train.state_shardings(model, optimizer, mesh, config.data.seq_len)
        train_step, eval_step = train.jit_steps_for(
            config, model, optimizer, schedule, shardings, mesh
        )
        writer = metrics.MetricsWriter(workdir)
        run = _Run(
            config,
            workdir,
            data,
            model,
            optimizer,
            mesh,
            abstract,
            shardings,
            train_step,
            eval_step,
            ckpt,
            writer,
            source,
        )
        summary = _loop(run)
    finally:
        ckpt.close()  # Waits for an in-flight save: a crash never loses a committed checkpoint.
        if writer is not None:
            writer.close()
    _sync("kiln_run_done")  # No process leaves while another still writes (clean shutdown).
    return summary


def _fresh_state(run: _Run) -> train.TrainState:
    init = jax.jit(
        lambda: train.init_state(
            run.model, run.optimizer, run.config.seed, run.config.data.seq_len
        ),
        out_shardings=run.shardings,
    )
    with sharding.activation_rules(run.mesh):
        return init()


def _to_disk(run: _Run, state: train.TrainState) -> train.TrainState:
    """The state in the checkpoints' per-layer layout (a copy only under model.scan_layers)."""
    return jax.jit(train.on_disk)(state) if run.model.config.scan_layers else state


def _from_disk(run: _Run, state: train.TrainState) -> train.TrainState:
    """A restored per-layer state in this run's layout, on its shardings."""
    if not run.model.config.scan_layers:
        return state
    return jax.jit(train.in_memory, out_shardings=run.shardings)(state)


def _initial_state(run: _Run) -> train.TrainState:
    """Restore order (logged): this workdir's latest checkpoint > init_from > scratch."""
    latest = run.ckpt.latest_step()
    if latest is not None:
        metrics.log(f"Restore: resuming from this workdir's checkpoint at step {latest}")
        target = train.on_disk(checkpoint.abstract_like(run.abstract, run.shardings))
        return _from_disk(run, run.ckpt.restore(latest, target, data_iter=run.data.train_iter))
    if run.source is None:
        metrics.log("Restore: no checkpoint in this workdir; initialising from scratch")
        return _fresh_state(run)
    source, cfg = run.source, run.config.init_from
    fresh = _fresh_state(run)
    if cfg.load == "state":
        target = train.on_disk(checkpoint.abstract_like(run.abstract, run.shardings))
        state = _from_disk(run, init_from.load_state(source, target))
        metrics.log(
            f"Restore: init_from {source.workdir} step {source.step}: full state (parameters and"
            " optimizer moments); step and schedule restart at 0"
        )
        return state.replace(step=fresh.step, rng=fresh.rng)
    if cfg.load != "params":
        raise KilnError(f"init_from.load={cfg.load!r} is unknown; use 'params' or 'state'.")
    fresh = _to_disk(run, fresh)  # init_from works on per-layer parameter paths.
    loaded, fresh_paths, unused = init_from.plan(source, fresh.params, cfg.skip)
    if not loaded:
        raise KilnError(
            f"init_from: no parameter of {source.workdir} matches this model (or init_from.skip"
            " skips them all); check init_from.workdir and init_from.skip."
        )
    params = init_from.load_params(source, fresh.params, loaded)
    metrics.log(
        f"Restore: init_from {source.workdir} step {source.step}: {len(loaded)} parameter"
        f" arrays loaded; fresh: {fresh_paths or 'none'}; not used: {unused or 'none'}"
    )
    return _from_disk(run, fresh.replace(params=params))


def _loop(run: _Run) -> dict[str, Any]:
    config = run.config
    state = _initial_state(run)
    param_count = sum(x.size for x in jax.tree.leaves(state.params))
    metrics.log(f"Model: {config.model.family}, {param_count:,} parameters")
    start = int(state.step)
    last_eval: tuple[int, dict] | None = None  # (step, validation result) of the last eval
    if start == 0:
        _log_eval(run.writer, 0, "validation", _validate(run, state.params))
    shapes = {k: v.shape for k, v in run.data.validation[0].items()}
    tracker = _StepMetrics(config, run.writer, start, shapes)
    tracker.last_good_checkpoint = run.ckpt.latest_step()
    started = time.perf_counter()
    end = (
        config.train.steps
        if config.train.stop_after <= 0
        else min(config.train.stop_after, config.train.steps)
    )
    for step in range(start + 1, end + 1):
        batch = to_global(next(run.data.train_iter), run.mesh, config.data.global_batch_size)
        state, step_metrics = run.train_step(state, batch)
        tracker.push(step, step_metrics)
        if step % config.eval.every == 0 or step == config.train.steps:
            tracker.flush()
            last_eval = (step, _validate(run, state.params))
            _log_eval(run.writer, step, "validation", last_eval[1])
        if step % config.checkpoint.every == 0 or step in (end, config.train.steps):
            tracker.flush()  # Never save a state whose loss was not checked.
            run.ckpt.save(step, _to_disk(run, state), run.data.train_iter)
            tracker.last_good_checkpoint = step
    tracker.flush()
    if end < config.train.steps:
        metrics.log(f"Stopped at step {end} (train.stop_after); re-run the command to continue.")
        return {"step": end}
    seconds = time.perf_counter() - started
    return _finish(run, state, param_count, seconds, last_eval)


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
    }
    task = run.data.task
    predictions: dict[str, list[str]] = {}
    for split in ("validation", "test"):
        reuse = split == "validation" and last_eval is not None and last_eval[0] == step
        if reuse and (task is None or finetuning.uses_head(config, task.task)):
            result = dict(last_eval[1])  # The loop evaluated this very state already.
        else:
            result = run.evaluate(state.params, split, with_task=task is not None)
        predictions[split] = result.pop("predictions", [])
        summary.update({f"{split}/{k}": v for k, v in result.items()})
    if task is not None:
        return _finish_task(run, summary, predictions["test"])
    first = _first_eval(run.workdir)
    if first is not None:
        summary["validation/perplexity_at_start"] = first
    if config.eval.sample_prompt and config.model.family == "gpt":
        summary["sample"] = config.eval.sample_prompt + sample_text(run, state.params)
    _write_summary(run.workdir, summary)
    start = f"{first:.2f} at step 0 -> " if first is not None else ""
    metrics.log(
        f"Done: validation perplexity {start}{summary['validation/perplexity']:.2f} at step"
        f" {summary['step']}; test perplexity {summary['test/perplexity']:.2f}."
        f" Summary: {os.path.join(run.workdir, 'summary.json')}"
    )
    if "sample" in summary:
        metrics.log(f"Sample ({config.decode.strategy}): {summary['sample']!r}")
    return summary


def _write_summary(workdir: str, summary: dict[str, Any]) -> None:
    if jax.process_index() == 0:
        config_lib.write_atomically(
            os.path.join(workdir, "summary.json"), json.dumps(summary, indent=2)
        )


def _finish_task(run: _Run, summary: dict[str, Any], test_predictions: list[str]) -> dict:
    """A fine-tune's summary.json (task metrics included) and predictions_test.jsonl."""
    task = run.data.task
    summary["task"] = task.task.name
    for split in ("validation", "test"):
        summary[f"{split}/examples"] = len(task.examples[split])
        if task.task.kind == "generation" and "chrf" in task.task.metrics:
            baseline = finetuning.copy_baseline(task, split)
            summary.update({f"{split}/copy_input_{k}": v for k, v in baseline.items()})
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "predictions_test.jsonl"), "w") as f:
            for example, pred in zip(task.examples["test"], test_predictions):
                row = {"id": example.id, "prediction": pred, "target": example.target}
                f.write(json.dumps(row) + "\n")
    _write_summary(run.workdir, summary)
    shown = ", ".join(f"{m} {summary[f'test/{m}']:.4g}" for m in task.task.metrics)
    metrics.log(
        f"Done: {task.task.name} at step {summary['step']}: test {shown} (validation "
        + ", ".join(f"{m} {summary[f'validation/{m}']:.4g}" for m in task.task.metrics)
        + f"). Summary: {os.path.join(run.workdir, 'summary.json')}"
    )
    return summary


def _first_eval(workdir: str) -> float | None:
    """Validation perplexity at step 0 from metrics.jsonl (kept across resumes)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row["step"] == 0 and "validation/perplexity" in row:
                return row["validation/perplexity"]
    return None
