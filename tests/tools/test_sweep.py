"""kiln.tools.sweep: point helpers, checks against the config, the CLI (dry run, emitted
scripts), and one end-to-end sweep of four tiny runs (resumed, then reported)."""

import json
import math
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import matplotlib.image
import pytest

from kiln.errors import KilnError
from kiln.tools import report, sweep

REPO = pathlib.Path(__file__).resolve().parents[2]
GPT = "experiments/gpt/pretrain.py:size=tiny"
SHELLCHECK = REPO / ".venv" / "bin" / "shellcheck"


TINY = {  # seconds per run (tests/test_finetune_run.py's known-good tiny setup)
    "data.data_dir": "data/tiny",
    "model.vocab_size": 512,
    "model.max_len": 32,
    "data.seq_len": 32,
    "data.global_batch_size": 8,
    "eval.batches": 1,
    "eval.sample_prompt": "",
    "tokenizer.max_sentences": 2000,
    "train.steps": 2,
    "train.log_every": 1,
    "optim.warmup_fraction": 0.5,
    "checkpoint.every": 2,
}


def experiment(tmp_path, sweep_body, name="exp.py", tiny=False):
    """An experiment file in tmp_path: gpt/pretrain.py's tiny config (shrunk to seconds per run
    when `tiny`) and a get_sweep returning `sweep_body` (None: no get_sweep)."""
    lines = [
        "from kiln import config_lib",
        "from kiln.tools import sweep",
        "",
        "def get_config(arg=None):",
        f"    c = config_lib.load_config({str(REPO / GPT)!r})",
        *(f"    c.{key} = {value!r}" for key, value in TINY.items() if tiny),
        "    return c",
    ]
    if sweep_body is not None:
        lines += ["", "def get_sweep(arg=None):", f"    return {sweep_body}"]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# Helpers for get_sweep.


def test_grid():
    points = sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
    assert points == [
        {"optim.lr": 1e-3, "seed": 0},
        {"optim.lr": 1e-3, "seed": 1},
        {"optim.lr": 3e-3, "seed": 0},
        {"optim.lr": 3e-3, "seed": 1},
    ]
    assert len(sweep.grid({"a": [1, 2], "b": ["x", "y", "z"], "c": [True]})) == 6
    with pytest.raises(KilnError, match="'seed' needs a non-empty list"):
        sweep.grid({"optim.lr": [1e-3], "seed": []})
    with pytest.raises(KilnError, match="non-empty dict"):
        sweep.grid({})


def test_zipped_and_concat():
    points = sweep.zipped({"optim.lr": [1e-3, 3e-3], "optim.warmup_fraction": [0.1, 0.5]})
    assert points == [
        {"optim.lr": 1e-3, "optim.warmup_fraction": 0.1},
        {"optim.lr": 3e-3, "optim.warmup_fraction": 0.5},
    ]
    with pytest.raises(KilnError, match="equal length"):
        sweep.zipped({"optim.lr": [1e-3, 3e-3], "seed": [0, 1, 2]})
    both = sweep.concat(points, sweep.grid({"seed": [5]}))
    assert both == [*points, {"seed": 5}]


def test_random_search_is_seeded():
    space = {"optim.lr": (1e-5, 1e-1, "log"), "optim.b2": (0.9, 0.99, "linear"), "seed": [0, 7]}
    points = sweep.random_search(space, n=200, seed=0)
    assert len(points) == 200
    assert points == sweep.random_search(space, n=200, seed=0)
    assert points != sweep.random_search(space, n=200, seed=1)
    lrs = [p["optim.lr"] for p in points]
    assert all(1e-5 <= lr <= 1e-1 for lr in lrs)
    # Log-uniform: about half below 1e-3 (a uniform draw would put 1% there).
    assert 60 < sum(lr < 1e-3 for lr in lrs) < 140
    b2 = [p["optim.b2"] for p in points]
    assert all(0.9 <= b <= 0.99 for b in b2) and abs(sum(b2) / len(b2) - 0.945) < 0.01
    assert {p["seed"] for p in points} == {0, 7}
    with pytest.raises(KilnError, match="lo > 0 for 'log'"):
        sweep.random_search({"optim.lr": (0.0, 1.0, "log")}, n=2)
    with pytest.raises(KilnError, match="n >= 1"):
        sweep.random_search(space, n=0)


def test_point_names_are_readable_safe_and_unique():
    assert sweep.point_name({"optim.lr": 0.001, "seed": 0}) == "lr=0.001_seed=0"
    assert sweep.point_name({"optim.lr": 1e-5, "model.dropout": 0.1}) == "lr=1e-05_dropout=0.1"
    shared = {"finetune.optim.lr": 1e-3, "scratch.optim.lr": 3e-3, "seed": 1}
    assert sweep.point_name(shared) == "finetune.optim.lr=0.001_scratch.optim.lr=0.003_seed=1"
    unsafe = sweep.point_name({"data.corpus": "../my data/x.txt", "model.use_bias": False})
    assert re.fullmatch(r"[A-Za-z0-9._+=-]+", unsafe), unsafe
    assert not unsafe.startswith(".") and "use_bias=False" in unsafe
    assert sweep.point_name({}) == "default"
    long = sweep.point_name({"data.corpus": "x" * 1000})
    assert len(long) <= 200
    assert long != sweep.point_name({"data.corpus": "x" * 999})
    grid = sweep.grid({"optim.lr": [1e-3, 3e-3, 1e-2], "seed": [0, 1]})
    assert len(set(sweep.names(grid))) == 6
    with pytest.raises(KilnError, match="both get the workdir name 'lr=0.001_seed=0'"):
        sweep.names([{"optim.lr": 1e-3, "seed": 0}, {"optim.lr": 1e-3, "seed": 0}])


# Points checked against the config.


def test_points_of_the_gpt_experiment():
    points = sweep.points(GPT)
    assert points == sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})


def test_int_for_a_float_field_becomes_a_float(tmp_path):
    spec = experiment(
        tmp_path, '[{"optim.lr": 1, "model.use_bias": False, "data.corpus": "bible"}]'
    )
    [point] = sweep.points(spec)
    assert point == {"optim.lr": 1.0, "model.use_bias": False, "data.corpus": "bible"}
    assert isinstance(point["optim.lr"], float)


def test_unknown_key_names_the_nearest(tmp_path):
    spec = experiment(tmp_path, '[{"optim.lr": 1e-3}, {"optim.lrr": 1e-3, "seed": 2}]')
    with pytest.raises(KilnError) as e:
        sweep.points(spec)
    message = str(e.value)
    assert "sweep point 1" in message and "'optim.lrr' is not in the config" in message
    assert "Did you mean 'optim.lr'?" in message


@pytest.mark.parametrize(
    "point, words",
    [
        ('{"train.steps": 2.5}', ["train.steps=2.5 is a float", "is an int field", "give an int"]),
        ('{"seed": "1"}', ["seed='1' is a str, but seed is an int field"]),
        ('{"optim.lr": "1e-3"}', ["optim.lr='1e-3' is a str, but optim.lr is a float field"]),
        ('{"model.use_bias": 1}', ["model.use_bias=1 is an int", "is a bool field"]),
        ('{"data.corpus": 3}', ["data.corpus=3 is an int", "is a str field", "give a string"]),
        ('{"objective.name": None}', ["objective.name=None is a NoneType", "is a str field"]),
    ],
)
def test_wrong_type(tmp_path, point, words):
    spec = experiment(tmp_path, f"[{point}]")
    with pytest.raises(KilnError) as e:
        sweep.points(spec)
    for word in words:
        assert word in str(e.value)


def test_no_get_sweep(tmp_path, capsys):
    spec = experiment(tmp_path, None)
    with pytest.raises(KilnError, match=r"exp.py has no get_sweep\(\); add one returning a list"):
        sweep.points(spec)
    assert sweep.main(["--config", spec, "--workdir", str(tmp_path / "s"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kiln.tools.sweep: error:") and "no get_sweep()" in err
    assert "Traceback" not in err


def test_bad_sweep_values(tmp_path):
    with pytest.raises(KilnError, match="non-empty list of dicts"):
        sweep.points(experiment(tmp_path, "[]"))
    with pytest.raises(KilnError, match="is not a dict"):
        sweep.points(experiment(tmp_path, '["optim.lr=1e-3"]', name="b.py"))


# The command line without training.


def test_dry_run_prints_one_command_per_point(tmp_path, capsys):
    workdir = tmp_path / "s"
    args = ["--config", GPT, "--workdir", str(workdir), "--dry-run", "--config.train.steps=3"]
    assert sweep.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    expected = sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
    for line, point in zip(lines, expected):
        cmd = shlex.split(line)
        name = sweep.point_name(point)
        assert cmd[:3] == [sys.executable, "-m", "kiln.main"]
        assert cmd[3:7] == ["--config", GPT, "--workdir", str(workdir / name)]
        assert cmd[7:] == [
            "--config.train.steps=3",
            f"--config.optim.lr={point['optim.lr']}",
            f"--config.seed={point['seed']}",
        ]
    assert not workdir.exists()  # a dry run writes nothing

    # A point whose summary.json reached train.steps is skipped; one short of it is not.
    (workdir / "lr=0.001_seed=1").mkdir(parents=True)
    (workdir / "lr=0.001_seed=1" / "summary.json").write_text('{"step": 3}')
    (workdir / "lr=0.003_seed=0").mkdir(parents=True)
    (workdir / "lr=0.003_seed=0" / "summary.json").write_text('{"step": 2}')
    assert sweep.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "# lr=0.001_seed=1: finished; skipped"
    assert [line.startswith(sys.executable) for line in lines] == [True, False, True, True]


def test_common_override_errors(tmp_path, capsys):
    base = ["--config", GPT, "--workdir", str(tmp_path / "s"), "--dry-run"]
    assert sweep.main([*base, "--config.train.stepz=3"]) == 2
    assert "Did you mean 'train.steps'?" in capsys.readouterr().err
    assert sweep.main([*base, "--config.seed=3"]) == 2
    assert "--config.seed is also set by get_sweep()" in capsys.readouterr().err
    assert sweep.main([*base, "--config.train.steps=x"]) == 2
    assert "train.steps is an int field; give an int" in capsys.readouterr().err
    assert sweep.main([*base, "stray"]) == 2
    assert "unexpected argument 'stray'" in capsys.readouterr().err
    assert sweep.main([*base, "--parallel", "0"]) == 2
    assert "--parallel=0 must be at least 1" in capsys.readouterr().err


def fake_launcher(root, relpath, log):
    """An executable at root/relpath that appends its arguments (one per line, then '--END--')
    to `log`."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" --END-- >> {shlex.quote(str(log))}\n'
    )
    path.chmod(0o755)


def calls(log):
    text = log.read_text().split("--END--\n")
    return [chunk.splitlines() for chunk in text if chunk]


def shellcheck(path):
    result = subprocess.run([str(SHELLCHECK), str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_emit_slurm(tmp_path, capsys):
    workdir = tmp_path / "s"
    assert sweep.main(["--config", GPT, "--workdir", str(workdir), "--emit", "slurm"]) == 0
    script = workdir / "submit_slurm.sh"
    assert f"Wrote {script}: 4 of 4 points" in capsys.readouterr().out
    assert os.access(script, os.X_OK)
    lines = script.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    jobs = [line for line in lines if line.startswith("sbatch ")]
    points = sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})
    for line, point in zip(jobs, points, strict=True):
        name = sweep.point_name(point)
        run_dir = str(workdir / name)
        assert lines[lines.index(line) - 1] == f"mkdir -p {run_dir}"  # slurm needs --output's
        assert shlex.split(line) == [
            "sbatch",
            f"--job-name={name}",
            f"--output={run_dir}/slurm-%j.out",
            "launch/slurm.sbatch",
            GPT,
            run_dir,
            f"--config.optim.lr={point['optim.lr']}",
            f"--config.seed={point['seed']}",
        ]
    record = json.loads((workdir / "sweep.json").read_text())
    assert record["config"] == GPT and [p["overrides"] for p in record["points"]] == points
    shellcheck(script)
    # Run it with stand-ins for sbatch and the launcher: four submissions, arguments intact.
    fake = tmp_path / "fake"
    log = tmp_path / "sbatch.log"
    fake_launcher(fake, "bin/sbatch", log)
    fake_launcher(fake, "launch/slurm.sbatch", tmp_path / "unused.log")
    env = dict(os.environ, PATH=f"{fake / 'bin'}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(script)], cwd=fake, env=env, capture_output=True)
    assert result.returncode == 0, result.stderr
    assert calls(log) == [shlex.split(line)[1:] for line in jobs]
    assert all((workdir / sweep.point_name(p)).is_dir() for p in points)
    # Outside the repository root it says so.
    result = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True)
    assert result.returncode == 2 and b"run this from the repository root" in result.stderr


def test_emit_tpu(tmp_path, capsys):
    workdir = tmp_path / "s"
    (workdir / "lr=0.003_seed=1").mkdir(parents=True)  # finished: left out of the script
    (workdir / "lr=0.003_seed=1" / "summary.json").write_text('{"step": 400}')
    assert sweep.main(["--config", GPT, "--workdir", str(workdir), "--emit", "tpu"]) == 0
    script = workdir / "submit_tpu.sh"
    assert "3 of 4 points" in capsys.readouterr().out
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    jobs = [line for line in text.splitlines() if line.startswith("launch/tpu_vm.sh ")]
    assert len(jobs) == 3 and "# lr=0.003_seed=1: finished" in text
    assert jobs[0] == (
        'launch/tpu_vm.sh --tpu "$TPU_NAME" --zone "$ZONE" -- '
        f"{GPT} {workdir}/lr=0.001_seed=0 --config.optim.lr=0.001 --config.seed=0"
    )
    shellcheck(script)
    fake = tmp_path / "fake"
    log = tmp_path / "tpu.log"
    fake_launcher(fake, "launch/tpu_vm.sh", log)
    env = dict(os.environ, TPU_NAME="my tpu", ZONE="us-central2-b")
    result = subprocess.run(["bash", str(script)], cwd=fake, env=env, capture_output=True)
    assert result.returncode == 0, result.stderr
    points = [
        {"optim.lr": 1e-3, "seed": 0},
        {"optim.lr": 1e-3, "seed": 1},
        {"optim.lr": 3e-3, "seed": 0},
    ]
    assert calls(log) == [
        [
            "--tpu",
            "my tpu",
            "--zone",
            "us-central2-b",
            "--",
            GPT,
            str(workdir / sweep.point_name(p)),
        ]
        + [f"--config.optim.lr={p['optim.lr']}", f"--config.seed={p['seed']}"]
        for p in points
    ]
    del env["TPU_NAME"]
    result = subprocess.run(["bash", str(script)], cwd=fake, env=env, capture_output=True)
    assert result.returncode != 0 and b"set TPU_NAME" in result.stderr


# End to end: real runs in subprocesses.


def run_sweep(spec, workdir, *flags):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
    )
    cmd = [
        sys.executable,
        "-m",
        "kiln.tools.sweep",
        "--config",
        spec,
        "--workdir",
        str(workdir),
        *flags,
    ]
    start = time.monotonic()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return result, time.monotonic() - start


def check_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
    spec = experiment(tmp_path, 'sweep.grid({"optim.lr": [1e-3, 3e-3], "seed": [0, 1]})', tiny=True)
    workdir = tmp_path / "s"
    result, _ = run_sweep(spec, workdir, "--parallel", "2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    names = ["lr=0.001_seed=0", "lr=0.001_seed=1", "lr=0.003_seed=0", "lr=0.003_seed=1"]
    assert [p["name"] for p in json.loads((workdir / "sweep.json").read_text())["points"]] == names
    for name in names:
        summary = json.loads((workdir / name / "summary.json").read_text())
        assert summary["step"] == 2 and math.isfinite(summary["validation/perplexity"])
        config = json.loads((workdir / name / "config.json").read_text())
        lr, seed = name.split("_")
        assert config["optim"]["lr"] == float(lr[3:]) and config["seed"] == int(seed[5:])
        assert "Done: validation perplexity" in (workdir / name / "log.txt").read_text()
    assert "4 points: 4 run, 0 skipped (finished), 0 failed" in result.stdout
    assert f"python -m kiln.tools.report {workdir}" in result.stdout

    logs = {name: (workdir / name / "log.txt").stat().st_size for name in names}
    result, seconds = run_sweep(spec, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "0 run, 4 skipped (finished)" in result.stdout and "started" not in result.stdout
    assert {name: (workdir / name / "log.txt").stat().st_size for name in names} == logs
    assert seconds < 30  # nothing ran: config loading only

    (workdir / names[2] / "summary.json").unlink()
    result, _ = run_sweep(spec, workdir, "--parallel", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 run, 3 skipped (finished), 0 failed" in result.stdout
    assert [line.split(":")[0] for line in result.stdout.splitlines() if "started" in line] == [
        f"[1/1] {names[2]}"
    ]
    assert (
        "resuming from this workdir's checkpoint at step 2"
        in (workdir / names[2] / "log.txt").read_text()
    )
    assert (workdir / names[2] / "summary.json").is_file()

    assert report.main([str(workdir)]) == 0
    text = (workdir / "report.md").read_text()
    first_table = text[text.index("\n|") :].split("\n\n")[0]  # (an "Over seeds" table follows)
    lines = [line for line in first_table.splitlines() if line.startswith("|")]
    header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert len(rows) == 4 and header[:4] == ["run", "optim.lr", "seed", "validation/perplexity"]
    checked = 0
    for row in rows:
        summary = json.loads((workdir / row[0] / "summary.json").read_text())
        for key, cell in zip(header, row):
            if "/" in key:
                assert math.isclose(float(cell), summary[key], rel_tol=1e-6), (key, cell)
                checked += 1
    assert checked >= 8
    values = [float(row[3]) for row in rows]
    assert values == sorted(values) and sorted(row[0] for row in rows) == names
    for name in ("loss", "validation", "optim.lr", "seed"):
        check_png(workdir / "plots" / f"{name}.png")


@pytest.mark.slow
def test_failed_points_are_reported_and_the_others_still_run(tmp_path):
    spec = experiment(tmp_path, 'sweep.grid({"model.d_model": [130, 131]})')
    workdir = tmp_path / "s"
    result, _ = run_sweep(spec, workdir)
    assert result.returncode == 1
    out = result.stdout
    assert "2 points: 0 run, 0 skipped (finished), 2 failed" in out
    for name in ("d_model=130", "d_model=131"):
        assert f"FAILED {name} (exit code 2); last lines of {workdir / name / 'log.txt'}" in out
    assert "model.d_model=130 is not divisible by model.n_heads=4" in out
