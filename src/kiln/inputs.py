"""A run's inputs: its tokenizer, the pre-training stream or labeled task data, and the fixed
evaluation batches (`prepare`)."""

import dataclasses
import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from kiln import defaults, finetuning, metrics, models, restore
from kiln import workdir as workdir_lib
from kiln.data import (
    corpus,
    finetune,
    hf_tokenizer,
    mixture,
    objectives,
    pipeline,
    tasks,
    token_cache,
)
from kiln.data import tokenizer as tokenizer_lib
from kiln.errors import KilnError


@dataclasses.dataclass
class Data:
    """Everything the loop reads: the tokenizer, the train iterator, fixed eval batches and,
    when fine-tuning, the labeled task with the examples its metrics score."""

    tokenizer: tokenizer_lib.Tokenizer
    train_iter: Any
    validation: list[dict[str, np.ndarray]]
    test: list[dict[str, np.ndarray]]
    task: tasks.Task | None = None  # set when fine-tuning on a labeled task
    examples: dict[str, list[tasks.Example]] = dataclasses.field(default_factory=dict)
    # A data.sources mixture's eval batches by split and source: `validation` and `test` are
    # these lists concatenated (each source's share of eval.batches by its weight).
    by_source: dict[str, dict[str, list[dict[str, np.ndarray]]]] = dataclasses.field(
        default_factory=dict
    )


def sync(name: str) -> None:
    """A barrier across the run's processes (a no-op with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def prepare_tokenizer(
    config: ml_collections.ConfigDict,
    workdir: str,
    train_documents: list[str] | Callable[[], list[str]],
    source_run: restore.Source | None = None,
) -> tokenizer_lib.AnyTokenizer:
    """Loads the workdir's tokenizer, else copies the `init_from` run's or `tokenizer.path`'s
    (a tokenizer.model, a run's workdir or a Hugging Face tokenizer directory: kiln's own as
    <workdir>/tokenizer.model, an imported one as <workdir>/tokenizer/), else trains one on
    `tokenizer.max_sentences` documents sampled from `train_documents` (or on what the callable
    returns, called only then)."""
    if workdir_lib.find_tokenizer(workdir) is None and jax.process_index() == 0:
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
            _copy_tokenizer(_tokenizer_file(source), workdir)
        else:
            metrics.log(f"Training a {config.tokenizer.model_type} tokenizer ...")
            if callable(train_documents):
                sample = train_documents()
            else:
                sample = sample_documents(
                    train_documents, config.tokenizer.max_sentences, config.seed
                )
            tokenizer_lib.train_tokenizer(
                sample,
                os.path.join(workdir, workdir_lib.TOKENIZER),
                vocab_size=config.model.vocab_size,
                model_type=config.tokenizer.model_type,
                seed=config.seed,
            )
    sync("tokenizer")
    dest = workdir_lib.tokenizer_path(workdir)
    tok = tokenizer_lib.load_tokenizer(dest)
    imported = not isinstance(tok, tokenizer_lib.Tokenizer)
    if tok.vocab_size > config.model.vocab_size or (
        not imported and tok.vocab_size != config.model.vocab_size
    ):
        more = " (or more: an imported model may have padding rows)" if imported else ""
        raise KilnError(
            f"model.vocab_size={config.model.vocab_size} but {dest} has {tok.vocab_size} pieces."
            f" Set --config.model.vocab_size={tok.vocab_size}{more}."
        )
    return tok


def sample_documents(documents: list[str], count: int, seed: int) -> list[str]:
    """``count`` documents drawn uniformly (seeded) from all of ``documents``, in their order;
    all of them when there are no more than ``count``."""
    if len(documents) <= count:
        return documents
    chosen = np.sort(np.random.default_rng([seed, 7]).choice(len(documents), count, replace=False))
    return [documents[i] for i in chosen]


def _tokenizer_file(path: str) -> str:
    """The tokenizer `tokenizer.path` names: a tokenizer.model file, or a directory (a run's
    workdir, or a Hugging Face tokenizer directory, also when `path` names its tokenizer.json
    or spiece.model)."""
    if os.path.isfile(path) and os.path.basename(path) in workdir_lib.HF_TOKENIZER_FILES:
        return os.path.dirname(path) or "."
    if os.path.isfile(path):
        return path
    if os.path.isdir(path):
        if (found := workdir_lib.find_tokenizer(path)) is not None:
            return found
        raise KilnError(
            f"tokenizer.path={path!r} is a directory without a tokenizer: expected"
            f" {workdir_lib.TOKENIZER} or {workdir_lib.TOKENIZER_DIR}/ (a kiln run), or"
            f" {' or '.join(workdir_lib.HF_TOKENIZER_FILES)} (a Hugging Face tokenizer"
            " directory, with tokenizer_config.json)."
        )
    raise KilnError(
        f"tokenizer.path={path!r}: no such file or directory. Point it at a tokenizer.model"
        " file, a finished run's workdir or a Hugging Face tokenizer directory, or set it to"
        ' "" to train a new tokenizer.'
    )


def _copy_tokenizer(source: str, workdir: str) -> None:
    """Copies a tokenizer file to <workdir>/tokenizer.model, or a tokenizer directory's files
    (checked to load first; never the weights beside them) to <workdir>/tokenizer/."""
    if not os.path.isdir(source):
        shutil.copyfile(source, os.path.join(workdir, workdir_lib.TOKENIZER))
        return
    tok = tokenizer_lib.load_tokenizer(source)
    tmp = os.path.join(workdir, f".{workdir_lib.TOKENIZER_DIR}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_lib.save_tokenizer(tok, tmp)
    os.replace(tmp, os.path.join(workdir, workdir_lib.TOKENIZER_DIR))


def _same_file(a: str, b: str) -> bool:
    """Whether two tokenizers are the same: files byte for byte, directories by the file that
    defines their vocabulary (tokenizer.json or spiece.model)."""
    if os.path.isdir(a) and os.path.isdir(b):
        a, b = str(hf_tokenizer.main_file(a)), str(hf_tokenizer.main_file(b))
    if not (os.path.isfile(a) and os.path.isfile(b)):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def prepare_task_data(
    config: ml_collections.ConfigDict, workdir: str, source_run: restore.Source | None
) -> Data:
    """Fine-tuning data: the labeled task's train stream and eval batches."""
    task = finetuning.load(config.task, config.data.data_dir)
    finetuning.check_model(config.model, task)
    texts = [f"{e.input}\n{e.pair}\n{e.target}" for e in task.splits["train"]]
    tok = prepare_tokenizer(config, workdir, texts, source_run)
    return task_data(config, task, tok)


def make_objective(
    config: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer
) -> objectives.Objective:
    """The pre-training objective the `objective` section describes."""
    o = config.objective
    return objectives.make_objective(
        o.name,
        models.family(config.model.family).layout,
        tok,
        config.data.seq_len,
        mask_rate=o.mask_rate,
        whole_word=o.whole_word,
        noise_density=o.noise_density,
        mean_noise_span_length=o.mean_noise_span_length,
        **defaults.electra_fields(o),
    )


def prepare(
    config: ml_collections.ConfigDict, workdir: str, source_run: restore.Source | None = None
) -> Data:
    """The run's `Data`: a labeled task's when `task.name` is set, else the pre-training
    corpus's (its tokenizer trained or copied into `workdir` first)."""
    if config.task.name:
        return prepare_task_data(config, workdir, source_run)
    d = config.data
    if d.get("sources") and not d.corpus:  # data.corpus, when set, replaces the mixture
        return prepare_sources(config, workdir, source_run)
    data_dir = d.data_dir or None
    train_docs = corpus.read_documents(d.corpus, "train", data_dir)
    tok = prepare_tokenizer(config, workdir, train_docs, source_run)
    objective = make_objective(config, tok)
    dataset = _train_dataset(config, tok, objective, train_docs)

    def eval_batches(split: str) -> list[dict[str, np.ndarray]]:
        # In corpus order the first batches would hold one source only: a fixed permutation.
        docs = corpus.read_documents(d.corpus, split, data_dir)
        return _eval_batches(config, tok, objective, docs, config.eval.batches)

    return Data(tok, iter(dataset), eval_batches("validation"), eval_batches("test"))


def _train_dataset(
    config: ml_collections.ConfigDict,
    tok: tokenizer_lib.AnyTokenizer,
    objective: objectives.Objective,
    documents: Any,
    weights: list[float] | None = None,
) -> Any:
    """The pre-training batches of `documents` (a list of texts, or one tokenized source per
    `weights` entry) for this process, as the `data` section says."""
    d = config.data
    return pipeline.make_train_dataset(
        documents,
        tok,
        seq_len=d.seq_len,
        global_batch_size=d.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        objective=objective,
        streams=d.streams,
        weights=weights,
    )


def prepare_sources(
    config: ml_collections.ConfigDict, workdir: str, source_run: restore.Source | None
) -> Data:
    """Pre-training data from the weighted mixture `data.sources`: shipped corpora read in
    memory, other sources from their token caches (built first by process 0 where missing,
    `kiln.data.mixture`), each process opening only the cache shards of its rows."""
    d = config.data
    specs = mixture.parse(d.sources)
    n, data_dir = config.tokenizer.max_sentences, d.data_dir or None

    def sample() -> list[str]:
        return mixture.sample_documents(specs, n, config.seed, data_dir)

    tok = prepare_tokenizer(config, workdir, sample, source_run)
    if jax.process_index() == 0:
        mixture.prepare_caches(config, workdir, str(tok.path), tok.vocab_size)
    sync("token_cache")
    root = mixture.cache_root(config, workdir)

    def documents(spec: mixture.Source, split: str) -> Any:
        if mixture.shipped(spec):
            return corpus.read_documents(spec.path, split, data_dir)
        cached = token_cache.CachedSplit(root / spec.name, split)
        if split == "train":
            return cached
        # Evaluation reads a few shards, enough text for all eval batches, so its memory does
        # not grow with the corpus.
        rows = config.eval.batches * d.global_batch_size
        return cached.first_documents(rows * objective.packed_length(d.seq_len))

    objective = make_objective(config, tok)
    train = [documents(s, "train") for s in specs]
    dataset = _train_dataset(config, tok, objective, train, [s.weight for s in specs])
    weights = np.asarray([s.weight for s in specs]) / sum(s.weight for s in specs)
    by_source: dict[str, dict[str, list]] = {"validation": {}, "test": {}}
    for split, found in by_source.items():
        for spec, weight in zip(specs, weights, strict=True):
            found[spec.name] = _eval_batches(
                config,
                tok,
                objective,
                documents(spec, split),
                max(1, round(config.eval.batches * weight)),
            )
    validation, test = ([b for bs in by_source[s].values() for b in bs] for s in by_source)
    return Data(tok, iter(dataset), validation, test, by_source=by_source)


def _eval_batches(
    config: ml_collections.ConfigDict,
    tok: tokenizer_lib.AnyTokenizer,
    objective: objectives.Objective,
    docs: Any,
    max_batches: int,
) -> list[dict[str, np.ndarray]]:
    """This process's rows of the fixed eval batches of `docs` (texts or tokenized): a seed-0
    permutation of them (the same in every run, so runs compare on the same text), packed."""
    order = np.random.default_rng(0).permutation(len(docs))
    docs = docs.select(order) if isinstance(docs, pipeline.Tokenized) else [docs[i] for i in order]
    batches = pipeline.make_eval_batches(
        docs,
        tok,
        seq_len=config.data.seq_len,
        batch_size=config.data.global_batch_size,
        max_batches=max_batches,
        objective=objective,
    )
    index, count = jax.process_index(), jax.process_count()
    return [pipeline.process_slice(b, index, count) for b in batches]


def task_data(
    config: ml_collections.ConfigDict, task: tasks.Task, tok: tokenizer_lib.Tokenizer
) -> Data:
    """A labeled task's `Data`: its training subset encoded as an endless stream, and the
    scored validation/test examples in fixed batches."""
    t, d = config.task, config.data
    family = models.family(config.model.family)
    layout = family.layout  # `finetune.check_task` (in make_train_dataset) checks the pairing.
    train = tasks.low_resource_subset(task.splits["train"], t.train_examples)
    common = dict(seq_len=d.seq_len, target_len=t.target_len, template=finetuning.template(t, task))
    dataset, cut = finetune.make_train_dataset(
        task,
        layout,
        tok,
        train,
        global_batch_size=d.global_batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pack=t.pack,
        **common,
    )
    target_len = t.target_len if task.kind == "generation" or not family.uses_head(task.kind) else 0
    _log_truncated("train", cut, len(train), d.seq_len, target_len)
    examples, batches = {}, {}
    for split in ("validation", "test"):
        chosen = task.splits[split]
        if t.eval_examples > 0:
            chosen = tasks.low_resource_subset(chosen, t.eval_examples)
        examples[split] = chosen
        full, cut = finetune.make_eval_batches(
            task, layout, tok, chosen, batch_size=d.global_batch_size, **common
        )
        index, count = jax.process_index(), jax.process_count()
        batches[split] = [pipeline.process_slice(b, index, count) for b in full]
        _log_truncated(split, cut, len(chosen), d.seq_len, target_len)
    metrics.log(
        f"Task {task.name} ({task.kind}): {len(train):,} training examples of"
        f" {len(task.splits['train']):,}; {len(examples['validation']):,} validation and"
        f" {len(examples['test']):,} test examples scored"
    )
    return Data(tok, iter(dataset), batches["validation"], batches["test"], task, examples)


def _log_truncated(split: str, cut: int, total: int, seq_len: int, target_len: int) -> None:
    if cut:
        limit = f" (or task.target_len={target_len})" if target_len else ""
        metrics.log(
            f"Note: {cut:,} of {total:,} {split} examples were longer than data.seq_len={seq_len}"
            f"{limit} and were truncated"
        )
