"""Multi-process runs on JAX's distributed runtime: 2 processes x 4 CPU devices (launched by
launch/cpu_cluster.sh, collectives over gloo) against 1 process x 8 devices."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from kiln import checkpoint, config_lib, models, validation
from kiln.errors import KilnError

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/gpt/pretrain.py:size=micro"
TINY = ["--config.eval.every=2", "--config.train.steps=4", "--config.checkpoint.every=2"]
XLA = "--xla_backend_optimization_level=0"  # As tests/conftest.py: the same compiler for both.


def _run(processes: int, workdir: str) -> str:
    """Runs the tiny config on `processes` processes x 8 / processes devices; process 0's
    output."""
    if processes == 1:
        command = [sys.executable, "-m", "kiln.main", "--config", CONFIG, "--workdir", workdir]
        env = {"XLA_FLAGS": f"{XLA} --xla_force_host_platform_device_count=8"}
    else:
        command = ["launch/cpu_cluster.sh", str(processes), CONFIG, workdir]
        env = {"XLA_FLAGS": XLA, "KILN_DEVICES_PER_PROCESS": str(8 // processes)}
    result = subprocess.run(
        [*command, *TINY], cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True
    )
    logs = [os.path.join(workdir, f) for f in os.listdir(workdir) if f.startswith("process_")]
    detail = result.stderr[-3000:] + "".join(open(f).read()[-2000:] for f in logs)
    assert result.returncode == 0, detail
    return result.stdout


def _losses(workdir: str) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every loss line in metrics.jsonl (the last one when resumed)."""
    out = {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        row = json.loads(line)
        for key in ("train/loss", "validation/loss"):
            if key in row:
                out[(row["step"], key)] = row[key]
    return out


def _params(workdir: str, step: int = 4) -> dict[str, np.ndarray]:
    """The checkpoint's parameters, restored onto one device of this process."""
    config = config_lib.load_json(os.path.join(workdir, "config.json"))
    model = models.build_model(config.model)
    example = models.example_inputs(model, 8)
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), **example)["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = checkpoint.abstract_like(shapes, jax.tree.map(lambda _: device, shapes))
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        params = ckpt.restore_params(step, abstract)
    finally:
        ckpt.close()
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in flat}


def _assert_same_run(a: str, b: str, steps=None) -> None:
    """Per-step losses within 1e-6 relative (a loss of 6 is only resolved to ~5e-7 in float32,
    and the two layouts reduce in different orders) and final parameters within float32
    reduction-order noise."""
    losses_a, losses_b = _losses(a), _losses(b)
    keys = [k for k in losses_a if steps is None or k[0] in steps]
    assert len(keys) >= (7 if steps is None else 3)
    for key in keys:
        bound = 1e-6 * max(1.0, abs(losses_b[key]))
        assert abs(losses_a[key] - losses_b[key]) <= bound, (key, losses_a[key], losses_b[key])
    params_a, params_b = _params(a), _params(b)
    assert params_a.keys() == params_b.keys() and len(params_a) > 5
    for path, value in params_a.items():
        if path.endswith("['key']['bias']"):
            # Softmax ignores a shift shared by all keys, so this bias's gradient is zero but
            # for float noise, which Adam scales up to lr-sized steps: noise, not a result.
            continue
        # Adam divides each update by its gradient's scale, so a float difference in a small
        # gradient becomes a difference of up to ~1e-6-1e-5 in 4 steps (seen: 1.5e-6 when the
        # tokenizer changed); a wrong slice or a skipped batch moves parameters by ~lr = 1e-3.
        np.testing.assert_allclose(value, params_b[path], rtol=1e-5, atol=2e-5, err_msg=path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The same 4-step run as 2 processes x 4 devices and as 1 process x 8 devices."""
    root = tmp_path_factory.mktemp("multiprocess")
    runs = {n: str(root / f"p{n}") for n in (2, 1)}
    for n, workdir in runs.items():
        _run(n, workdir)
    return runs


def test_two_processes_equal_one(straight):
    two, one = straight[2], straight[1]
    summary = json.load(open(os.path.join(two, "summary.json")))
    assert summary["step"] == 4
    # Only process 0 prints progress: process 1's log has no metrics or summary lines.
    process_1 = open(os.path.join(two, "process_1.log")).read()
    assert "step 4/4" not in process_1 and "Done:" not in process_1
    # Only process 0 writes metrics: one line per step and eval, no duplicates.
    steps = [json.loads(line)["step"] for line in open(os.path.join(two, "metrics.jsonl"))]
    assert steps == [json.loads(line)["step"] for line in open(os.path.join(one, "metrics.jsonl"))]
    _assert_same_run(two, one)
    # Not vacuous: another run's parameters differ by far more than the tolerance.
    first, last = _params(one, 2), _params(one, 4)
    assert max(np.abs(first[p] - last[p]).max() for p in first) > 1e-4


@pytest.mark.parametrize("written_by, resumed_by", [(2, 1), (1, 2)])
def test_checkpoints_restore_across_process_counts(straight, tmp_path, written_by, resumed_by):
    """Step 2 of one layout, resumed to step 4 by the other, ends as the other's straight run."""
    workdir = str(tmp_path / "resumed")
    shutil.copytree(straight[written_by], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    os.remove(os.path.join(workdir, "summary.json"))
    output = _run(resumed_by, workdir)
    assert "resuming from this workdir's checkpoint at step 2" in output
    # Really resumed: steps 1 and 2 were not trained again (their metrics lines are the copied
    # ones), and steps 3 and 4 were.
    steps = [json.loads(line).get("step") for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert steps.count(1) == 1 and steps.count(3) == 2, steps
    _assert_same_run(workdir, straight[resumed_by], steps={3, 4})


def test_process_count_must_divide_the_global_batch():
    config = config_lib.load_config(CONFIG)
    config.data.global_batch_size = 8
    with pytest.raises(KilnError, match="not divisible by the 3 processes"):
        validation.validate(config, 6, process_count=3)


def test_unreachable_coordinator_fails_clearly(tmp_path):
    command = [
        sys.executable,
        "-m",
        "kiln.main",
        "--config",
        CONFIG,
        "--workdir",
        str(tmp_path / "w"),
        "--config.distributed.initialize=True",
        "--config.distributed.coordinator_address=localhost:9",  # discard port: nobody there
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=1",
        "--config.distributed.timeout_s=2",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "kiln: error: The coordinator localhost:9 (process 0) could not be reached" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


_DATA_CHILD = """
import json, sys
import jax
import numpy as np
index, count, port, root = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 8 // count)
if count > 1:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=index)
from kiln import config_lib, inputs
from kiln.data import token_cache
opened = []
real = token_cache.CachedSplit._stem
def stem(self, shard):
    if self.split == "train":
        opened.append(int(shard))
    return real(self, shard)
token_cache.CachedSplit._stem = stem
config = config_lib.load_config("experiments/gpt/pretrain.py:size=tiny")
for key, value in json.loads(sys.argv[5]).items():
    section, name = key.split(".")
    config[section][name] = value
import os
os.makedirs(f"{root}/p{count}", exist_ok=True)
data = inputs.prepare(config, f"{root}/p{count}")
batches = [next(data.train_iter)["inputs"] for _ in range(4)]
np.save(f"{root}/p{count}_{index}.npy", np.stack(batches))
json.dump(sorted(set(opened)), open(f"{root}/p{count}_{index}.json", "w"))
"""


def test_each_process_reads_only_its_cache_shards(tmp_path):
    """A mixture of a 6-shard token cache and a shipped corpus on 2 processes x 4 devices:
    process 0 prepares the cache, each process opens only the shards of its rows, and the
    global batches equal the 1-process run's."""
    from kiln.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choice(words, rng.integers(5, 60))) for _ in range(1200)]
    for i in range(6):
        (tmp_path / f"s{i}.txt").write_text("\n\n".join(docs[i::6]))
    tok = train_tokenizer(docs, tmp_path / "tok.model", vocab_size=512)
    overrides = {
        "data.sources": f"web={tmp_path}/s*.txt weight=3; bible=bible",
        "data.data_dir": "data/tiny",
        "data.seq_len": 32,
        "model.max_len": 32,
        "model.vocab_size": 512,
        "data.global_batch_size": 8,
        "data.streams": 4,
        "eval.batches": 1,
        "tokenizer.path": str(tok.path),
    }
    port = str(20000 + int(rng.integers(20000)))
    env = {**os.environ, "XLA_FLAGS": XLA, "JAX_PLATFORMS": "cpu"}
    runs = [(0, 1)], [(0, 2), (1, 2)]
    for run in runs:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", _DATA_CHILD, str(i), str(n), port, str(tmp_path)]
                + [json.dumps(overrides)],
                cwd=ROOT,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i, n in run
        ]
        for child in children:
            _, err = child.communicate(timeout=240)
            assert child.returncode == 0, err[-3000:]
    one = np.load(tmp_path / "p1_0.npy")
    two = np.concatenate([np.load(tmp_path / f"p2_{i}.npy") for i in (0, 1)], axis=1)
    assert one.shape == (4, 8, 32) and np.array_equal(one, two)
    opened = [set(json.load(open(tmp_path / f"p2_{i}.json"))) for i in (0, 1)]
    assert set(json.load(open(tmp_path / "p1_0.json"))) == set(range(6)) == opened[0] | opened[1]
    assert len(opened[0] & opened[1]) <= 1 and max(len(o) for o in opened) <= 4
