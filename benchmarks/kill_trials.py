"""kill -9 at random points of a run (saves included), then resume: how many resumes end
bit-identical to the run never killed (losses of every step and the final parameters).

  .venv/bin/python benchmarks/kill_trials.py [--trials 20] [--steps 12] [--seed 0] [--no-append]

Each trial starts `python -m kiln.main` on a tiny GPT config with a checkpoint every step and
dropout on (so the random state must resume too), SIGKILLs it a random 0-0.6 s after a random
step's progress line (with a checkpoint every step, often while a save is being written: the
table says when an unfinished save folder was left), re-runs the same command to the end and
compares. Prints a table and appends it to benchmarks/RESULTS.md. tests/test_reliability.py runs
two such trials at fixed points.
"""

import argparse
import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import common  # noqa: F401  (the host-memory setting, RESULTS.md)
import jax
import numpy as np

from kiln import checkpoint

ROOT = common.ROOT
FLAGS = [
    "--config=experiments/gpt/pretrain.py:size=micro",
    "--config.eval.every=4",
    "--config.checkpoint.every=1",
    "--config.checkpoint.keep=2",
    "--config.model.dropout=0.1",
]


def command(workdir: pathlib.Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kiln.main",
        f"--workdir={workdir}",
        *FLAGS,
        f"--config.train.steps={steps}",
    ]


def run_to_end(workdir: pathlib.Path, steps: int) -> str:
    result = subprocess.run(command(workdir, steps), cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"run in {workdir} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def kill_at(workdir: pathlib.Path, steps: int, step: int, delay: float) -> bool:
    """Starts the run, SIGKILLs it `delay` s after the progress line of `step`; returns whether
    an unfinished save folder was left (the kill landed during a save)."""
    proc = subprocess.Popen(
        command(workdir, steps),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = threading.Event()

    def watch() -> None:
        for line in proc.stdout:
            if line.startswith(f"step {step}/"):
                seen.set()
        seen.set()  # The run ended first.

    threading.Thread(target=watch, daemon=True).start()
    seen.wait()
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return any(".orbax-checkpoint-tmp" in p.name for p in (workdir / "checkpoints").glob("*"))


def losses(workdir: pathlib.Path) -> dict[int, float]:
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train/loss" in row:
            out[row["step"]] = row["train/loss"]
    return out


def params(workdir: pathlib.Path, step: int) -> list[np.ndarray]:
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints")
    try:
        return [np.asarray(x) for x in jax.tree.leaves(ckpt.restore_raw(step)["params"])]
    finally:
        ckpt.close()


def identical(a: pathlib.Path, b: pathlib.Path, steps: int) -> bool:
    if losses(a) != losses(b):
        return False
    return all(np.array_equal(x, y) for x, y in zip(params(a, steps), params(b, steps)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = pathlib.Path(tempfile.mkdtemp(prefix="kiln_kill_trials_"))
    try:
        straight = root / "straight"
        run_to_end(straight, args.steps)
        rows, good, during_save = [], 0, 0
        for trial in range(1, args.trials + 1):
            workdir = root / f"trial_{trial}"
            step, delay = rng.randint(1, args.steps - 1), round(rng.uniform(0.0, 0.6), 2)
            mid_save = kill_at(workdir, args.steps, step, delay)
            out = run_to_end(workdir, args.steps)
            resumed = out.split("checkpoint at step ")[1].split()[0] if "at step " in out else "0"
            same = identical(straight, workdir, args.steps)
            good += same
            during_save += mid_save
            rows.append(
                f"| {trial} | after step {step} + {delay:.2f} s | {'yes' if mid_save else 'no'}"
                f" | {resumed} | {'yes' if same else '**no**'} |"
            )
            print(rows[-1], flush=True)
            shutil.rmtree(workdir, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = "\n".join(
        [
            "| trial | killed | unfinished save left | resumed from | bit-identical |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    description = (
        f"kill -9 then resume, gpt:tiny (vocab 512, seq 32, batch 8, dropout 0.1) for"
        f" {args.steps} steps, a checkpoint every step (keep 2), seed {args.seed}:"
        f" **{good} of {args.trials} resumes bit-identical** to the run never killed (every"
        f" step's loss and the final parameters); {during_save} kills left an unfinished save."
    )
    common.record("kill_trials", description, table, None if args.no_append else common.RESULTS)
    if good != args.trials:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
