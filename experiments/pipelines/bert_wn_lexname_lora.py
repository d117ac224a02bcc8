"""The BERT wn_lexname pipeline with a LoRA arm: full fine-tuning, LoRA and scratch compared.

  python -m kiln.main --workdir runs/pl \
      --config experiments/pipelines/bert_wn_lexname_lora.py:size=tiny

Stages: `pretrain`, `finetune`, `lora` and `scratch`, the stages of
experiments/pipelines/bert_wn_lexname.py plus `lora`: the `finetune` stage with its base frozen
and rank-`rank` adapters on every attention and MLP kernel (plus the fresh classifier head)
trained at `lora_lr` (LoRA wants a larger rate than full fine-tuning). `lora` can be merged into
a plain run afterwards: `python -m kiln.tools.convert --merge --workdir runs/pl/lora --out M`.

Arguments: those of bert_wn_lexname.py (`size`, `seed`, `lrs`), and `rank` (default 8),
`lora_lr` (default 3e-3). Any stage's field can also be set on the command line, e.g. LoRA on
the plain pipeline's fine-tune: `--config.finetune.finetune.lora.rank=8`.
"""

import os

import ml_collections

from kiln import arms, config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, size="tiny", seed="0", lrs="", rank="8", lora_lr="3e-3")
    base_arg = f"size={args['size']},seed={args['seed']},lrs={args['lrs']}"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bert_wn_lexname.py")
    base = config_lib.load_module(path, "kiln_bert_wn_lexname").get_config(base_arg)
    stages = {name: base[name] for name in base.stages}
    # The LoRA arm copies the first full fine-tuning stage (`finetune`, or `finetune_lr...`).
    first = next(name for name in stages if name.startswith("finetune"))
    lora = ml_collections.ConfigDict(stages[first].to_dict())
    lora.finetune.lora.rank = int(args["rank"])
    lora.optim.lr = float(args["lora_lr"])
    names = list(stages)
    names.insert(names.index(first) + 1, "lora")
    stages["lora"] = lora
    return arms.pipeline({s: stages[s] for s in names}, select=base.select, advice=base.advice)
