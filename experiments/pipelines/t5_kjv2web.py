"""T5 pipeline: span-corruption pre-training, then kjv2web (KJV verse -> WEB verse), vs scratch.

  python -m kiln.main --config experiments/pipelines/t5_kjv2web.py:size=tiny --workdir runs/t5p

Stages: `pretrain` (span corruption on the train split of the shipped corpus), `finetune`
(text to text on `train_examples` verse pairs, from `pretrain`'s checkpoint) and `scratch` (the
same from random initialisation). Test chrF and BLEU are reported next to the copy-the-input
baseline (`test/copy_input_chrf`, `test/copy_input_bleu`: 71.5 and 51.9 on the full test set).

Arguments: `size` = tiny (about 15 CPU-minutes, 20 minutes of wall time measured on a shared
2-core CPU; scores 1,000 test verses; too small to learn copying: chrF 10.4 fine-tuned, 18.7 from
scratch, 71.5 copying the input) | cpu | gpu (cpu and gpu not measured yet); `seed`.
"""

import ml_collections

from kiln import config_lib, defaults

# name: (d_model, layers, heads, d_ff, vocab, pretrain steps, pretrain batch, train examples,
#        epochs, fine-tuning lr, examples scored (0 = all))
SIZES = {
    "tiny": (128, 2, 4, 512, 2048, 500, 16, 5_000, 2, 1e-3, 1_000),
    "cpu": (128, 2, 4, 512, 4096, 6_000, 32, 24_526, 3, 1e-3, 0),
    "gpu": (512, 6, 8, 1024, 8192, 50_000, 256, 24_526, 5, 5e-4, 0),
}
SEQ_LEN = 64


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = config_lib.parse_arg(arg, size="tiny", seed="0")
    d_model, layers, heads, d_ff, vocab, steps, batch, examples, epochs, lr, scored = (
        config_lib.pick("size", args["size"], SIZES)
    )
    pretrain = defaults.run_sections(
        seq_len=SEQ_LEN, batch=batch, steps=steps, lr=2e-3, objective="span_corruption"
    )
    pretrain.seed = int(args["seed"])
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
    stages = defaults.finetune_arms(
        pretrain,
        (lr,),
        task="kjv2web",
        train_examples=examples,
        epochs=epochs,
        seq_len=SEQ_LEN,
        batch=32,
        seed=pretrain.seed,
        target_len=64,
        eval_examples=scored,
    )
    return defaults.pipeline({"pretrain": pretrain, **stages}, select="chrf")
