"""A pipeline's stages: fine-tuning (`finetune_stage`), the fine-tuned and from-scratch arms
(`finetune_arms`), few-shot prompting (`fewshot_stage`) and the pipeline config itself
(`pipeline`); and the shipped pipelines' optional arguments: fine-tuning seeds (`seeds=0/1/2`),
the labeled set's size (`labels=1000`) and a few-shot arm (`fewshot=K`)."""

from typing import Any

import ml_collections

from kiln import defaults, models
from kiln import seeds as seeds_lib
from kiln.errors import KilnError


def parse_seeds(text: str, seed: int) -> tuple[int, ...]:
    """`seeds=0/1/2` -> (0, 1, 2); "" -> (`seed`,): the pipeline's one seed."""
    if not text:
        return (seed,)
    try:
        values = tuple(int(x) for x in text.split("/") if x.strip())
    except ValueError:
        values = ()
    if not values or len(set(values)) != len(values) or min(values) < 0:
        raise KilnError(
            f"seeds={text!r} is not a list of distinct seeds; write them separated by '/',"
            " e.g. seeds=0/1/2 (or leave it out for the one seed of `seed`)."
        )
    return values


def parse_labels(text: str, default: int, task: str) -> int:
    """`labels=1000` -> 1000 labeled training examples; `labels=all` -> the task's whole train
    split (`tasks.TRAIN_SIZES`); "" -> `default`."""
    from kiln.data import tasks

    if not text:
        return default
    if text == "all":
        return tasks.TRAIN_SIZES[task]
    if not text.isdigit() or int(text) == 0:
        raise KilnError(
            f"labels={text!r} is not a number of labeled examples; use e.g. labels=1000 (the"
            " first 1,000 training examples by md5 of the id), labels=all, or leave it out."
        )
    return int(text)


def parse_shots(text: str) -> int | None:
    """`fewshot=K` -> K demonstrations (0 = zero-shot); "" -> None (no few-shot arm)."""
    if not text:
        return None
    if not text.isdigit():
        raise KilnError(
            f"fewshot={text!r} is not a number of demonstrations; use e.g. fewshot=1 (one-shot"
            " prompts), fewshot=0 (zero-shot), or leave it out for no few-shot arm."
        )
    return int(text)


def fewshot_arm(
    pretrain: ml_collections.ConfigDict,
    shots: int | None,
    *,
    task: str,
    scoring: str,
    eval_examples: int,
    run_seeds: tuple[int, ...],
    max_new_tokens: int,
) -> dict[str, ml_collections.ConfigDict]:
    """{"fewshot": a stage prompting `@pretrain` with `shots` demonstrations} ({} for None);
    one `fewshot_seed<N>` per seed (demonstrations drawn by it) when `run_seeds` has several.
    A KilnError for a family that does not generate (it cannot be prompted)."""
    if shots is None:
        return {}
    family = pretrain.model.family
    if not models.family(family).generates:
        raise KilnError(
            f"fewshot={shots}: model.family={family!r} does not generate text, so it cannot be"
            " prompted; leave fewshot out for this pipeline (a gpt or t5 pipeline has the arm)."
        )

    def stage(seed: int) -> ml_collections.ConfigDict:
        return fewshot_stage(
            pretrain,
            task=task,
            shots=shots,
            scoring=scoring,
            eval_examples=eval_examples,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )

    if len(run_seeds) < 2:
        return {"fewshot": stage(run_seeds[0])}
    return {seeds_lib.stage_name("fewshot", s): stage(s) for s in run_seeds}


def finetune_stage(
    pretrain: ml_collections.ConfigDict,
    *,
    task: str,
    train_examples: int,
    epochs: float,
    lr: float,
    seq_len: int,
    batch: int,
    init_from: str = "@pretrain",
    skip: str = "",
    seed: int | None = None,
    target_len: int | None = None,
    eval_examples: int = 0,
) -> ml_collections.ConfigDict:
    """A fine-tuning run of `pretrain`'s architecture on a labeled task (a pipeline stage).

    The model section and tokenizer are the pre-training run's; `init_from=""` makes the
    from-scratch baseline with the same budget (`epochs` over `train_examples`). Heads that
    pre-training had and the task replaces are skipped by name (`skip`, a regex).
    """
    # Today's defaults, overlaid with the source's values: a run written by an older kiln
    # still gets every section.
    c = defaults.run_sections(seq_len=seq_len, batch=batch, steps=1, lr=lr, objective="")
    c.model = defaults.model_section(pretrain.model.family)
    _overlay(c, pretrain.to_dict())
    c.seed = pretrain.seed if seed is None else seed
    c.tokenizer.path = "@pretrain"
    c.data.seq_len = seq_len
    c.data.global_batch_size = batch
    c.task.name = task
    c.task.train_examples = train_examples
    steps = max(1, round(epochs * train_examples / batch))
    c.train.steps = steps
    c.train.log_every = max(1, steps // 10)
    c.eval.every = steps  # validation at the start and the end
    c.checkpoint.every = steps
    c.checkpoint.keep = 1
    c.optim.lr = lr
    c.optim.schedule = "linear"
    c.optim.end_lr_fraction = 0.0
    c.optim.warmup_fraction = 0.1
    c.init_from.workdir = init_from
    c.init_from.hf = ""  # Not the pre-training run's own source.
    c.init_from.skip = skip
    if target_len is not None:
        c.task.target_len = target_len
    c.task.eval_examples = eval_examples
    return c


def finetune_arms(
    pretrain: ml_collections.ConfigDict,
    lrs: tuple[float, ...],
    seeds: tuple[int, ...] = (),
    **stage: Any,
) -> dict[str, ml_collections.ConfigDict]:
    """The `finetune` (from `@pretrain`) and `scratch` stages at each learning rate of `lrs`.

    With one rate the stages are `finetune` and `scratch`; with several, `finetune_lr1e-3`,
    `scratch_lr1e-3`, ... (arms whose rate the comparison picks on validation). With two or more
    `seeds`, each stage is repeated per fine-tuning seed as `<stage>_seed<N>` (the comparison
    reports mean +- std over them; `kiln.seeds`). `stage` goes to `finetune_stage`.
    """
    stages = {}
    for arm, source in (("finetune", "@pretrain"), ("scratch", "")):
        for rate in lrs:
            name = arm if len(lrs) == 1 else f"{arm}_lr{rate:.0e}".replace("e-0", "e-")
            if len(seeds) < 2:
                seed = {"seed": seeds[0]} if seeds else {}
                stages[name] = finetune_stage(
                    pretrain, lr=rate, init_from=source, **{**stage, **seed}
                )
                continue
            for s in seeds:
                stages[seeds_lib.stage_name(name, s)] = finetune_stage(
                    pretrain, lr=rate, init_from=source, **{**stage, "seed": s}
                )
    return stages


def fewshot_stage(
    pretrain: ml_collections.ConfigDict,
    *,
    task: str,
    shots: int = 0,
    scoring: str = "generate",
    init_from: str = "@pretrain",
    eval_examples: int = 0,
    normalize: bool = False,
    seed: int | None = None,
    seq_len: int = 0,
    max_new_tokens: int = 32,
    template: str = "",
    label_words: str = "",
) -> ml_collections.ConfigDict:
    """A pipeline stage that trains nothing (`train.steps=0`) and scores `init_from` (default
    the pre-training stage) on `task` by `shots`-shot prompting (`kiln.prompting`): `scoring`
    "generate" (task metrics of greedy answers) or "rank" (label words by log-likelihood,
    `normalize` per token). `seq_len` is the prompt budget (0 = the model's max_len)."""
    c = finetune_stage(
        pretrain,
        task=task,
        train_examples=0,
        epochs=0.0,
        lr=0.0,
        seq_len=pretrain.data.seq_len,
        batch=pretrain.data.global_batch_size,
        init_from=init_from,
        seed=seed,
        eval_examples=eval_examples,
    )
    c.train.steps = 0
    c.tokenizer.path = ""  # The prompted run's own tokenizer is used.
    c.prompting = ml_collections.ConfigDict()
    c.prompting.shots = shots  # demonstrations from the task's train split
    c.prompting.scoring = scoring  # generate | rank
    c.prompting.normalize = normalize  # rank: mean log-probability per token
    c.prompting.seed = c.seed  # picks the demonstrations
    c.prompting.seq_len = seq_len or pretrain.model.max_len  # prompt budget in tokens
    c.prompting.max_new_tokens = max_new_tokens  # generate: tokens per answer
    c.prompting.template = template  # "" = the task's (kiln.prompting.TEMPLATES)
    c.prompting.label_words = label_words  # "label=word,...": rank's words for labels
    return c


def _overlay(config: ml_collections.ConfigDict, values: dict[str, Any]) -> None:
    """Sets the fields of `config` that `values` has (nested), ignoring unknown keys."""
    for key, value in values.items():
        if key not in config:
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _overlay(config[key], value)
        else:
            config[key] = value


def pipeline(
    stages: dict[str, ml_collections.ConfigDict], select: str, advice: str = ""
) -> ml_collections.ConfigDict:
    """A pipeline config: `stages` run in order; arms compared on validation `select`;
    `advice` is printed after the verdict (what one run does not show, where to look further)."""
    c = ml_collections.ConfigDict()
    c.stages = tuple(stages)
    c.select = select
    c.advice = advice
    for name, stage in stages.items():
        c[name] = stage
    return c
