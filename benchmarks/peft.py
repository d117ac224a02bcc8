"""Parameter-efficient fine-tuning against full fine-tuning: what trains, what the optimizer
holds, how long a step takes.

  .venv/bin/python benchmarks/peft.py [--spec bert:small] [--rounds 4] [--no-append]

A `wn_lexname` classification fine-tune (45 classes, seq_len 64, batch 32, AdamW, float32) of
the `experiments/<family>/pretrain.py` size named by --spec, three ways: full fine-tuning,
LoRA rank 8 on every attention and MLP kernel (`finetune.lora.rank=8`), and prompt tuning with
20 vectors (`finetune.prompt_tuning.length=20`). The train steps are compiled once each and run
in turns (A B C A B C ...). Prints trainable parameters, optimizer-state bytes and the median
step time, with their ratios to full fine-tuning; appends the table to benchmarks/RESULTS.md.
"""

import argparse
import statistics

import common
import jax

from kiln import arms, build, peft, sharding
from kiln.tools import fits

SEQ_LEN, BATCH, CLASSES = 64, 32, 45
VARIANTS = {
    "full fine-tuning": {},
    "LoRA r=8": {"lora": 8},
    "prompt tuning, 20 vectors": {"prompt": 20},
}


def finetune_config(spec: str, lora: int = 0, prompt: int = 0):
    """The benchmark's fine-tune of `spec`'s architecture (`common.load_spec`)."""
    pretrain = common.load_spec(spec)
    config = arms.finetune_stage(
        pretrain,
        task="wn_lexname",
        train_examples=1000,
        epochs=1.0,
        lr=1e-4,
        seq_len=SEQ_LEN,
        batch=BATCH,
        init_from="",
    )
    config.tokenizer.path = ""
    config.model.dropout = 0.0
    config.finetune.lora.rank = lora
    config.finetune.prompt_tuning.length = prompt
    return config


def measure(config) -> tuple:
    """(train step, state, batch, trainable parameters, optimizer-state bytes)."""
    built = build.build(config, CLASSES)
    state = built.fresh_state(0)
    batch = jax.device_put(
        fits.synthetic_batch(config, BATCH, 0), sharding.batch_sharding(built.mesh)
    )
    trainable = peft.count(built.partition.trainable(built.abstract.params))
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(built.abstract.opt_state))
    state, out = built.train_step(state, batch)  # Compiles.
    jax.block_until_ready(out)
    return built.train_step, state, batch, trainable, opt_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="bert:small", help="family:size of the architecture")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    runs = {}
    for name, variant in VARIANTS.items():
        print(f"compiling {name} ...", flush=True)
        runs[name] = [*measure(finetune_config(args.spec, **variant)), []]
    common.interleaved_rounds(runs, args.rounds, args.steps)
    full = runs["full fine-tuning"]
    full_ms = statistics.median(full[5])
    lines = [
        "| method | trainable params | vs full | optimizer MiB | vs full | step ms | vs full |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (_, _, _, trainable, opt_bytes, times) in runs.items():
        ms = statistics.median(times)
        lines.append(
            f"| {name} | {trainable:,} | {trainable / full[3]:.4f} | {opt_bytes / 2**20:.2f} |"
            f" {opt_bytes / full[4]:.4f} | {1000 * ms:.0f} | {ms / full_ms:.2f} |"
        )
    common.record(
        "peft",
        f"{args.spec} architecture fine-tuned on wn_lexname ({CLASSES} classes), seq_len"
        f" {SEQ_LEN}, batch {BATCH}, AdamW, float32; median of {args.rounds} interleaved rounds"
        f" x {args.steps} steps. LoRA on every attention and MLP kernel; the task head trains"
        " fully in every method.",
        "\n".join(lines),
        None if args.no_append else str(common.RESULTS),
    )


if __name__ == "__main__":
    main()
