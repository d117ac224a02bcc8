"""Score a finished run, or an imported Hugging Face model, on a labeled task without training.

  python -m kiln.tools.evaluate --workdir runs/ft --task wn_lexname
  python -m kiln.tools.evaluate --workdir runs/gpt --task bible_genre --shots 4 --scoring rank
  python -m kiln.tools.evaluate --workdir runs/t5 --task mine.jsonl --split validation \
      --examples 200 --out preds.jsonl

`--workdir` is a run (its latest checkpoint, or `--step`) or the output of `kiln.tools.convert
--from-hf`. A run fine-tuned with a head (bert, gpt classification/regression) answers its own
task with that head; a run fine-tuned to answer in text (t5, gpt generation) answers its own
task as it was trained, unless `--shots` or `--scoring` ask for prompting; every other case (a
pre-trained-only or imported model, another task) is scored by prompting (`kiln.prompting`):
k demonstrations from the task's train split, then generation with the task metrics or
log-likelihood ranking of the label words. `--task` is a shipped task or a JSONL file
(`kiln.data.tasks.load_task`). Prints the metrics and writes one JSON line per example to `--out`
(default `<workdir>/evaluation_<task>_<split>.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections

from kiln import prompting, restore
from kiln.errors import KilnError
from kiln.evaluation import (  # noqa: F401 (re-exported: the CLI's helpers live there)
    SPLITS,
    Evaluator,
    examples_of,
    head_outputs,
    prompting_options,
    restore_model,
    run_stage,
    task_section,
)
from kiln.tools import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.evaluate",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--workdir", required=True, help="a finished run or a convert --from-hf output")
    p.add_argument("--step", type=int, default=-1, help="checkpoint step; -1 = the latest")
    p.add_argument("--task", required=True, help="a shipped task name or a .jsonl task file")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--examples", type=int, default=0, help="score the first N (md5 order); 0 = all")
    p.add_argument("--shots", type=int, default=None, help="prompting: demonstrations (default 0)")
    p.add_argument("--scoring", choices=prompting.SCORINGS, default=None, help="prompting")
    p.add_argument("--normalize", action="store_true", help="rank: mean log-prob per token")
    p.add_argument("--seed", type=int, default=None, help="prompting: picks the demonstrations")
    p.add_argument("--seq-len", type=int, default=None, help="prompt budget; default max_len")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generate: tokens per answer")
    p.add_argument("--template", default=None, help="prompting: a query template with {input}")
    p.add_argument("--label-words", default=None, help='rank: "label=word,..." overrides')
    p.add_argument("--batch-size", type=int, default=None, help="prompts per decoding call")
    p.add_argument("--out", default=None, help="predictions JSONL (default in the workdir)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.run("kiln.tools.evaluate", lambda: _run(args))


def _run(args: argparse.Namespace) -> None:
    for flag, value, low in (("--examples", args.examples, 0), ("--step", args.step, -1)):
        if value < low:
            raise KilnError(f"{flag}={value} must be at least {low}.")
    options = {
        "shots": args.shots,
        "scoring": args.scoring,
        "normalize": True if args.normalize else None,
        "seed": args.seed,
        "seq_len": args.seq_len,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "label_words": args.label_words,
        "batch_size": args.batch_size,
    }
    prompting_options(ml_collections.ConfigDict({"model": {"max_len": 128}}), **options)
    init = ml_collections.ConfigDict({"workdir": args.workdir, "step": args.step})
    source = restore.resolve(init, "--")
    task_cfg = task_section(source.config, args.task)
    name = os.path.splitext(os.path.basename(args.task))[0]
    out = args.out or os.path.join(source.workdir, f"evaluation_{name}_{args.split}.jsonl")
    cli.check_output_file(out, "--out")
    evaluator = Evaluator(source, task_cfg, options)
    examples = examples_of(evaluator.task, args.split, args.examples)
    metrics, rows = evaluator.score(examples)
    if jax.process_index() != 0:
        return
    cli.write_text(out, "".join(json.dumps(r) + "\n" for r in rows), "--out")
    shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    print(
        f"{evaluator.task.name} {args.split} ({len(examples)} examples, {evaluator.describe()},"
        f" step {source.step} of {source.workdir}): {shown}"
    )
    print(json.dumps({"metrics": metrics, "predictions": out}))


if __name__ == "__main__":
    sys.exit(main())
