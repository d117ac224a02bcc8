"""kiln against the codebases a researcher would use instead, side by side in one run.

  make bench          # = .venv/bin/python benchmarks/peers.py
  .venv/bin/python benchmarks/peers.py --families gpt --rounds 3 --no-append

For each family (gpt, bert, t5) at one shape (default: 4 layers, 4 heads, d_model 256, d_ff
1024, seq_len 256, vocab 8192, batch 16, float32), every system trains on the same batch (made
by kiln's objective: causal LM, masked LM, span corruption) with forward + backward + AdamW:

- kiln: the real jitted, donated `kiln.train.train_step`, with kiln's host memory setting
  (`kiln.tools.host_memory`, which the peers run without; benchmarks/host_memory.py measures both).
- hf_flax: transformers 4.57.6 Flax models (FlaxGPT2LMHeadModel, FlaxBertForMaskedLM,
  FlaxT5ForConditionalGeneration) under jax.jit with optax.adamw, the same jax as kiln.
- torch: the PyTorch models of the same families, eager, torch 2.13.0 CPU build.
- maxtext (gpt only): MaxText's own trainer on synthetic data, where a Python 3.12 exists;
  a fresh process in each of its turns (it cannot be driven step by step).

The peers live in virtualenvs under benchmarks/.cache/, created here on first use (never in
requirements.txt). Each system runs in its own process (benchmarks/peer_worker.py) that
compiles once and warms up 5 steps; the systems then take turns, A B C A B C ..., `--steps`
steps each per round, so machine noise falls on all of them alike. Tokens/s is the median
over rounds. FLOPs follow kiln/flops.py for every system (attention included; causal
attention counted in full), and MFU divides model FLOP/s by the float32 matmul peak measured
in this run: the best of numpy and jitted JAX on a 2048 x 2048 matmul, measured before and
after the systems run.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import common
import numpy as np

from kiln import flops
from kiln.data import objectives
from kiln.tools import fits

CACHE = common.ROOT / "benchmarks" / ".cache"
SHAPE = {
    "d_model": 256,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 1024,
    "vocab_size": 8192,
    "seq_len": 256,
    "batch": 16,
}
FAMILIES = ("gpt", "bert", "t5")
PEER_PACKAGES = ("torch==2.13.0", "transformers==4.57.6")
SAME_AS_KILN = ("jax", "jaxlib", "flax", "optax", "numpy")  # pinned to requirements.txt


def kiln_config(family: str, shape: dict = SHAPE):
    """kiln's pre-training config of `family` (GPT-2 / classic BERT / T5 v1.1 styles) resized to
    `shape`, dropout off."""
    config = common.load_spec(f"{family}:small")
    model = config.model
    model.d_model, model.n_layers, model.d_ff = shape["d_model"], shape["n_layers"], shape["d_ff"]
    model.n_heads = model.n_kv_heads = shape["n_heads"]
    model.vocab_size, model.max_len = shape["vocab_size"], shape["seq_len"]
    model.dropout = 0.0
    if family == "t5":
        model.n_decoder_layers = shape["n_layers"]
    config.data.seq_len, config.data.global_batch_size = shape["seq_len"], shape["batch"]
    return config


# ---------------------------------------------------------------------------------------------
# Peer environments


def _pins() -> dict[str, str]:
    pins = {}
    for line in (common.ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[name.lower()] = version
    return pins


def ensure_venv(name: str, python: str, packages: list[str]) -> pathlib.Path:
    """benchmarks/.cache/<name>/bin/python with `packages`, created once (a stamp file records
    what was installed; a different list reinstalls)."""
    venv = CACHE / name
    stamp = venv / ".installed"
    want = "\n".join(packages)
    if stamp.exists() and stamp.read_text() == want:
        return venv / "bin" / "python"
    print(f"Creating {venv} ({', '.join(packages)}) ...", flush=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *packages], check=True)
    stamp.write_text(want)
    return venv / "bin" / "python"


def hf_python() -> pathlib.Path:
    pins = _pins()
    same = [f"{name}=={pins[name]}" for name in SAME_AS_KILN]
    base = getattr(sys, "_base_executable", sys.executable)
    return ensure_venv("peers-hf", base, [*PEER_PACKAGES, *same])


def find_python312() -> str | None:
    """A Python 3.12 interpreter (PATH, then pyenv's versions), or None."""
    candidates = [shutil.which("python3.12") or ""]
    candidates += sorted(
        str(p) for p in pathlib.Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")
    )
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.startswith("Python 3.12"):
            return candidate
    return None


# ---------------------------------------------------------------------------------------------
# Systems


@dataclasses.dataclass
class Result:
    system: str
    params: int = 0
    seconds: list[float] = dataclasses.field(default_factory=list)  # per step, one per round
    minor_faults: list[float] = dataclasses.field(default_factory=list)  # per step, per round
    kernel_seconds: list[float] = dataclasses.field(default_factory=list)  # same
    loss: float = float("nan")
    max_rss_bytes: int = 0
    skipped: str = ""  # why the system did not run

    @property
    def step_time(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


class Worker:
    """A peer_worker.py process: started (compiles and warms up), then asked for N steps."""

    def __init__(
        self,
        system: str,
        python: str,
        family: str,
        shape_file: str,
        batch_file: str,
        extra_env: dict[str, str] | None = None,
    ):
        self.result = Result(system)
        env = {**os.environ, "PYTHONPATH": str(common.ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
        env.update(extra_env or {})
        command = [python, str(common.ROOT / "benchmarks" / "peer_worker.py"), "--system", system]
        command += ["--family", family, "--shape", shape_file, "--batch", batch_file]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        ready = self._reply()
        self.result.params = ready.get("params", 0)

    def _reply(self) -> dict:
        for line in self.process.stdout:
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"{self.result.system} worker exited (code {self.process.wait()})")

    def run(self, steps: int) -> None:
        self.process.stdin.write(f"{steps}\n")
        self.process.stdin.flush()
        reply = self._reply()
        self.result.seconds.append(reply["seconds"] / steps)
        self.result.minor_faults.append(reply["minor_faults"] / steps)
        self.result.kernel_seconds.append(reply["kernel_seconds"] / steps)
        self.result.loss = reply["loss"]

    def close(self) -> Result:
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        self.result.max_rss_bytes = self._reply()["max_rss_bytes"]
        self.process.wait()
        return self.result


# MaxText's own trainer at the same shape: its default (llama2) decoder block with a GELU MLP and
# tied embeddings has GPT-2's matmuls; remat "minimal" keeps the dots (no recomputation, as in
# the other systems).
MAXTEXT_OVERRIDES = (
    "hardware=cpu dataset_type=synthetic attention=dot_product enable_checkpointing=false"
    " skip_jax_distributed_system=true dtype=float32 weight_dtype=float32 enable_dropout=false"
    " mlp_activations=[gelu] logits_via_embedding=true remat_policy=minimal"
    " adam_weight_decay=0.01 run_name=kiln_peer"
)
# Runs a module like `python -m`, then prints the process's peak RSS as a JSON line.
_RSS_WRAPPER = (
    "import atexit, json, resource, runpy, sys; atexit.register(lambda: print(json.dumps("
    "{'max_rss_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True));"
    " sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__')"
)


class MaxTextRounds:
    """MaxText (gpt only) in the turns of `bench_family`: it cannot be driven step by step, so
    each `run` is one fresh process of its own trainer, timed by its log's per-step seconds after
    the first two steps (compilation)."""

    def __init__(self, tmp: str):
        self.result = Result("maxtext")
        python = find_python312()
        if python is None:
            raise RuntimeError("no Python 3.12 found (MaxText needs it)")
        venv_python = str(ensure_venv("peers-maxtext", python, ["maxtext[tpu]==0.2.5"]))
        package = subprocess.run(
            [venv_python, "-c", "import maxtext, os; print(os.path.dirname(maxtext.__file__))"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        shape = (
            f"base_emb_dim={SHAPE['d_model']} base_num_query_heads={SHAPE['n_heads']}"
            f" base_num_kv_heads={SHAPE['n_heads']} head_dim={SHAPE['d_model'] // SHAPE['n_heads']}"
            f" base_mlp_dim={SHAPE['d_ff']} base_num_decoder_layers={SHAPE['n_layers']}"
            f" vocab_size={SHAPE['vocab_size']} max_target_length={SHAPE['seq_len']}"
            f" per_device_batch_size={SHAPE['batch']}"
        )
        self.command = [venv_python, "-c", _RSS_WRAPPER, "maxtext.trainers.pre_train.train"]
        self.command += [f"{package}/configs/base.yml", f"base_output_directory={tmp}/maxtext"]
        self.command += (MAXTEXT_OVERRIDES + " " + shape).split()
        self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}

    def run(self, steps: int) -> None:
        if self.result.skipped:
            return
        command = [*self.command, f"steps={steps + 2}"]
        out = subprocess.run(command, capture_output=True, text=True, env=self.env)
        log = out.stdout + out.stderr
        times = re.findall(r"completed step: (\d+), seconds: ([\d.]+),.*? loss: ([\d.]+)", log)
        timed = [float(sec) for step, sec, _ in times if int(step) >= 2]
        if out.returncode or not timed:
            self.result.skipped = f"MaxText failed (exit {out.returncode}): {log[-300:]!r}"
            return
        self.result.seconds.append(statistics.median(timed))
        self.result.loss = float(times[-1][2])
        rss = re.findall(r'"max_rss_bytes": (\d+)', log)
        self.result.max_rss_bytes = max(self.result.max_rss_bytes, int(rss[-1]) if rss else 0)

    def close(self) -> Result:
        return self.result


# ---------------------------------------------------------------------------------------------
# Peak


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n matmul, numpy (its BLAS) or jitted JAX."""
    a = np.ones((n, n), np.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return max(2 * n**3 / best, flops.measure_matmul_flops("float32", n, repeats))


# ---------------------------------------------------------------------------------------------


def write_inputs(family: str, tmp: str) -> tuple[dict, str, str, str]:
    """The family's batch, and the files the workers read in `tmp`: (batch, shape file, kiln's
    batch file, the peers' batch file)."""
    batch = fits.synthetic_batch(kiln_config(family), SHAPE["batch"], seed=0)
    kiln_file, shape_file = os.path.join(tmp, f"{family}.npz"), os.path.join(tmp, "shape.json")
    np.savez(kiln_file, **batch)
    # The peers' models score every position: the same targets, scattered back (bert).
    dense = {k: v for k, v in batch.items() if k != "predict_positions"}
    dense["targets"], dense["weights"] = objectives.dense_predictions(batch)
    peer_file = os.path.join(tmp, f"{family}_dense.npz")
    np.savez(peer_file, **dense)
    with open(shape_file, "w") as f:
        json.dump(SHAPE, f)
    return batch, shape_file, kiln_file, peer_file


def bench_family(family: str, systems: dict[str, str], rounds: int, steps: int, tmp: str) -> list:
    config = kiln_config(family)
    batch, shape_file, kiln_file, peer_file = write_inputs(family, tmp)
    workers, results = [], []
    for system, python in systems.items():
        if system == "maxtext" and family != "gpt":
            continue
        print(f"[{family}] starting {system} ...", flush=True)
        try:
            data = kiln_file if system == "kiln" else peer_file
            if system == "maxtext":
                workers.append(MaxTextRounds(tmp))
            else:
                workers.append(Worker(system, python, family, shape_file, data))
        except RuntimeError as e:
            results.append(Result(system, skipped=str(e)))
    for r in range(rounds):
        for worker in workers:
            worker.run(steps)
        line = ", ".join(
            f"{w.result.system} " + ("skipped" if w.result.skipped else
                                     f"{1000 * w.result.seconds[-1]:.0f} ms")
            for w in workers
        )  # fmt: skip
        print(f"[{family}] round {r + 1}/{rounds}: {line}", flush=True)
    results = [w.close() for w in workers] + results
    shapes = {k: v.shape for k, v in batch.items()}
    tokens, step_flops = flops.step_cost(config.model.to_dict(), shapes, SHAPE["batch"])
    return [(family, r, tokens, step_flops) for r in results]


def table(rows: list, peak: float) -> tuple[str, list[str]]:
    lines = [
        "| family | system | parameters | step ms | tokens/s | vs kiln | MFU | peak RSS MiB |"
        " loss after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = []
    kiln_speed = {f: t / r.step_time for f, r, t, _ in rows if r.system == "kiln" and r.seconds}
    for family, r, tokens, step_flops in rows:
        if r.skipped:
            lines.append(f"| {family} | {r.system} | skipped: {r.skipped} |||||||")
            continue
        speed = tokens / r.step_time
        ratio = speed / kiln_speed[family] if family in kiln_speed else float("nan")
        lines.append(
            f"| {family} | {r.system} | {f'{r.params / 1e6:.2f}M' if r.params else '-'} |"
            f" {1000 * r.step_time:.0f} |"
            f" {speed:,.0f} | {ratio:.2f} | {100 * step_flops / r.step_time / peak:.1f}% |"
            f" {r.max_rss_bytes / 2**20:,.0f} | {r.loss:.3f} |"
        )
    for family in dict.fromkeys(f for f, *_ in rows):
        peers = [t / r.step_time for f, r, t, _ in rows if f == family and r.system != "kiln"
                 and r.seconds]  # fmt: skip
        if peers and family in kiln_speed:
            summary.append(
                f"{family}: kiln / fastest peer = {kiln_speed[family] / max(peers):.2f}x"
            )
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--systems", nargs="+", default=["kiln", "hf_flax", "torch", "maxtext"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2, help="steps per system per round")
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()

    pythons = {"kiln": sys.executable}
    if {"hf_flax", "torch"} & set(args.systems):
        hf = str(hf_python())
        pythons.update(hf_flax=hf, torch=hf)
    pythons = {s: p for s, p in pythons.items() if s in args.systems}
    if "maxtext" in args.systems:
        pythons["maxtext"] = ""  # MaxTextRounds finds its own Python 3.12.
    peak = matmul_peak()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            rows += bench_family(family, pythons, args.rounds, args.steps, tmp)
    peak = max(peak, matmul_peak())
    text, summary = table(rows, peak)
    common.record(
        "peers",
        f"Shape {SHAPE}, float32, AdamW, dropout off, same batch for every system. Median of"
        f" {args.rounds} interleaved rounds x {args.steps} steps. MFU peak: {peak / 1e9:,.0f}"
        " GFLOP/s (best of numpy and jitted JAX, 2048^2 float32 matmul, this run). "
        + "; ".join(summary)
        + ".",
        text,
        None if args.no_append else str(common.RESULTS),
    )


if __name__ == "__main__":
    main()
