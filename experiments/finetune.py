"""Fine-tune a finished pre-training run on a labeled task (shipped, or your own JSONL file).

  python -m kiln.main --workdir runs/ft \\
      --config experiments/finetune.py:from=runs/p/pretrain,task=wn_lexname,examples=5000
  python -m kiln.main --workdir runs/mine \\
      --config experiments/finetune.py:from=runs/p/pretrain,task=jsonl,path=my_data.jsonl

The architecture and tokenizer are the `from` run's (its config.json and tokenizer.model);
its parameters are loaded, a new classification head starts fresh. Arguments: `from` (a run's
workdir or <workdir>/checkpoints/<step>), `task` (wn_lexname | bible_genre | kjv2web |
code_summary | code_generation | wn_reverse_dictionary | jsonl), `path` (jsonl: the file; each
line has `text`+`label` or `input`+`target`), `examples` (low-resource subset: the first N training
examples by md5 of their id; 0 = all), `epochs`, `lr`, `seq_len`, `batch`, `seed`. Everything
else is a `--config.` override, e.g. `--config.task.template="Definition: {input}"`,
`--config.optim.freeze_body=True`, `--config.optim.layer_decay=0.8`.
"""

import os

import ml_collections

from kiln import arms, config_lib, models
from kiln.data import tasks, user_tasks
from kiln.errors import KilnError


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg,
        **{"from": ""},
        task="wn_lexname",
        path="",
        examples="0",
        epochs="3",
        lr="1e-3",
        seq_len="128",
        batch="32",
        seed="0",
    )
    source = args["from"]
    if not source:
        raise KilnError(
            "experiments/finetune.py needs `from=<pre-training workdir>`, e.g."
            " --config experiments/finetune.py:from=runs/p/pretrain,task=wn_lexname"
        )
    workdir = source
    if os.path.basename(os.path.dirname(os.path.abspath(source))) == "checkpoints":
        workdir = os.path.dirname(os.path.dirname(os.path.abspath(source)))
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise KilnError(f"from={source!r}: no run there ({config_path} is missing).")
    pretrain = config_lib.load_json(config_path)
    if "stages" in pretrain:
        raise KilnError(f"from={source!r} is a pipeline; name one of its stages' workdirs.")
    task = user_tasks.load_any(
        args["task"], data_dir=pretrain.data.data_dir or None, path=args["path"]
    )
    examples = len(tasks.low_resource_subset(task.splits["train"], int(args["examples"])))
    c = arms.finetune_stage(
        pretrain,
        task=args["task"],
        train_examples=examples,
        epochs=float(args["epochs"]),
        lr=float(args["lr"]),
        seq_len=int(args["seq_len"]),
        batch=int(args["batch"]),
        init_from=source,
        seed=int(args["seed"]),
    )
    c.tokenizer.path = ""  # The init_from run's tokenizer.
    c.task.path = args["path"]
    c.task.train_examples = int(args["examples"])
    if not models.family(pretrain.model.family).uses_head(task.kind):  # It answers in text.
        c.task.target_len = 64
    return c
