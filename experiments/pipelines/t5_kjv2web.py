"""T5 pipeline: denoising pre-training, then kjv2web (KJV verse -> WEB verse), vs scratch.

  python -m kiln.main --config experiments/pipelines/t5_kjv2web.py:size=tiny --workdir runs/t5p

Stages: `pretrain` (denoising on the train split of the shipped corpus: T5's span-corrupted
inputs, the whole row as the target), `finetune`
(text to text on `train_examples` verse pairs, from `pretrain`'s checkpoint) and `scratch` (the
same from random initialisation). Test chrF and BLEU are reported next to the copy-the-input
baseline (`test/copy_input_chrf`, `test/copy_input_bleu`: 71.5 and 51.9 on the full test set).

Arguments: `size` = tiny (about 15 CPU-minutes, 20 minutes of wall time measured on a shared
2-core CPU; scores 1,000 test verses; with span_corruption, too small to learn copying: chrF
10.4 fine-tuned, 18.7 from scratch, 71.5 copying the input) | cpu (measured by `make
reproduce`: docs/reproduction.md) | gpu (not measured yet); `seed`;
`seeds` (fine-tuning seeds separated by `/`, e.g. `seeds=0/1/2`: stages `finetune_seed0`, ...;
the comparison reports mean +- std); `labels` (verse pairs fine-tuned on, or `all`: 24,526;
default the size's); `fewshot=K` (adds a `fewshot` arm: `pretrain` prompted with K
demonstrations, no training); `scored` (validation/test examples scored; default the size's);
`objective` (pre-training: denoise, the default: the whole row as the target, so the decoder
learns to copy; with it the fine-tuned model beats copying the input at size=cpu (test chrF 73.7
vs 71.5, docs/reproduction.md), where span_corruption (T5's sentinel targets) stayed at chrF 16
| span_corruption | prefix_lm).
Measured with span_corruption, `size=tiny,fewshot=1,scored=300`: test chrF 1.9 one-shot, 12.0
fine-tuned, 18.4 from scratch (docs/finetuning.md).
"""

import ml_collections

from kiln import arms, config_lib, defaults

# name: (d_model, layers, heads, d_ff, vocab, pretrain steps, pretrain batch, train examples,
#        epochs, fine-tuning lr, examples scored (0 = all))
SIZES = {
    "tiny": (128, 2, 4, 512, 2048, 500, 16, 5_000, 2, 1e-3, 1_000),
    "cpu": (128, 2, 4, 512, 4096, 6_000, 32, 24_526, 3, 1e-3, 0),
    "gpu": (512, 6, 8, 1024, 8192, 50_000, 256, 24_526, 5, 5e-4, 0),
}
SEQ_LEN = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(
        arg,
        size="tiny",
        seed="0",
        seeds="",
        fewshot="",
        scored="",
        labels="",
        objective="denoise",
    )
    d_model, layers, heads, d_ff, vocab, steps, batch, examples, epochs, lr, scored = (
        config_lib.pick("size", args["size"], SIZES)
    )
    pretrain = defaults.run_sections(
        seq_len=SEQ_LEN, batch=batch, steps=steps, lr=2e-3, objective=args["objective"]
    )
    pretrain.seed = int(args["seed"])
    run_seeds = arms.parse_seeds(args["seeds"], pretrain.seed)
    scored = int(args["scored"]) if args["scored"] else scored
    pretrain.optim.weight_decay = 0.0
    pretrain.eval.every = max(100, steps // 5)
    pretrain.checkpoint.every = max(100, steps // 5)
    pretrain.model = defaults.model_section(
        "t5",
        vocab_size=vocab,
        d_model=d_model,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=heads,
        d_ff=d_ff,
        max_len=128,
        position="none",
        norm="rmsnorm",
        mlp="geglu",
        use_bias=False,
        tie_embeddings=False,
        scale_attention=False,
        norm_eps=1e-6,
    )
    stages = arms.finetune_arms(
        pretrain,
        (lr,),
        task="kjv2web",
        train_examples=arms.parse_labels(args["labels"], examples, "kjv2web"),
        epochs=epochs,
        seq_len=SEQ_LEN,
        batch=32,
        seeds=run_seeds,
        target_len=64,
        eval_examples=scored,
    )
    fewshot = arms.fewshot_arm(
        pretrain,
        arms.parse_shots(args["fewshot"]),
        task="kjv2web",
        scoring="generate",
        eval_examples=scored,
        run_seeds=run_seeds,
        max_new_tokens=64,
    )
    return arms.pipeline({"pretrain": pretrain, **fewshot, **stages}, select="chrf")
