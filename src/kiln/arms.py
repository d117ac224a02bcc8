"""The shipped pipelines' optional arms, from their config arguments: fine-tuning seeds
(`seeds=0/1/2`), the labeled set's size (`labels=1000`) and a few-shot prompting arm
(`fewshot=K`) for the families that generate."""

import ml_collections

from kiln import defaults, models, seeds
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
        return defaults.fewshot_stage(
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
    return {seeds.stage_name("fewshot", s): stage(s) for s in run_seeds}
