"""GPT pipeline: causal-LM pre-training on text and code, then code_summary, vs scratch.

  python -m kiln.main --config experiments/pipelines/gpt_code_summary.py:size=tiny --workdir runs/gp

Stages: `pretrain` (causal LM on the train split of the Bible, WordNet and the SymPy functions
without their docstrings, so no summary is seen), `finetune` (prompt = function source, then
the [SEP] token; completion = the first paragraph of its docstring; the loss is on the
completion only; from `pretrain`'s checkpoint) and `scratch` (the same from random
initialisation). Scored by greedy decoding with the KV cache: ROUGE-L and BLEU.

Arguments: `size` = tiny (about 25 CPU-minutes, 44 minutes of wall time measured on a shared
2-core CPU; scores 300 test functions; ROUGE-L 13.0 fine-tuned vs 10.7 from scratch) | cpu
(measured by `make reproduce`: docs/reproduction.md) | gpu (not measured yet); `seed`; `seeds` (fine-tuning seeds separated by `/`, e.g.
`seeds=0/1/2`: stages `finetune_seed0`, ...; the comparison reports mean +- std); `labels`
(functions fine-tuned on, or `all`: 6,009, the default); `fewshot=K` (adds a `fewshot` arm:
`pretrain` prompted with K demonstrations, no training); `scored`
(validation/test examples scored; default the size's).
"""

import ml_collections

from kiln import arms, config_lib, defaults

# name: (d_model, layers, heads, d_ff, vocab, pretrain steps, pretrain batch, epochs,
#        fine-tuning lr, examples scored (0 = all))
SIZES = {
    "tiny": (128, 2, 4, 512, 2048, 500, 16, 2, 1e-3, 300),
    "cpu": (256, 4, 4, 1024, 4096, 4_000, 16, 4, 1e-3, 0),
    "gpu": (768, 12, 12, 3072, 16384, 50_000, 128, 5, 3e-4, 0),
}
SEQ_LEN = 256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg, size="tiny", seed="0", seeds="", fewshot="", scored="", labels=""
    )
    d_model, layers, heads, d_ff, vocab, steps, batch, epochs, lr, scored = config_lib.pick(
        "size", args["size"], SIZES
    )
    pretrain = defaults.run_sections(
        seq_len=SEQ_LEN, batch=batch, steps=steps, lr=2e-3, objective="causal_lm"
    )
    pretrain.seed = int(args["seed"])
    run_seeds = arms.parse_seeds(args["seeds"], pretrain.seed)
    scored = int(args["scored"]) if args["scored"] else scored
    pretrain.data.corpus = "bible,wordnet,sympy"
    pretrain.eval.every = max(100, steps // 5)
    pretrain.checkpoint.every = max(100, steps // 5)
    pretrain.model = defaults.model_section(
        "gpt",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        d_ff=d_ff,
        max_len=SEQ_LEN,
    )
    stages = arms.finetune_arms(
        pretrain,
        (lr,),
        task="code_summary",
        train_examples=arms.parse_labels(args["labels"], 6_009, "code_summary"),  # default: all
        epochs=epochs,
        seq_len=SEQ_LEN,
        batch=16,
        seeds=run_seeds,
        target_len=48,
        eval_examples=scored,
    )
    fewshot = arms.fewshot_arm(
        pretrain,
        arms.parse_shots(args["fewshot"]),
        task="code_summary",
        scoring="generate",
        eval_examples=scored,
        run_seeds=run_seeds,
        max_new_tokens=48,
    )
    return arms.pipeline({"pretrain": pretrain, **fewshot, **stages}, select="rouge_l")
