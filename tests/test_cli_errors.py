"""Every command line turns bad input into one paragraph and exit code 2, a second run on a
workdir is refused, and a bug ends in one paragraph that names a crash log (exit code 1).

Each bad input here gave a Python traceback (or, for checkpoint.keep=0, exit code 0 and no
checkpoint) before issue 17."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from kiln import config_lib
from kiln import workdir as workdir_lib
from kiln.errors import KilnError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "experiments/gpt/pretrain.py:size=tiny"


def _python(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`python *args` from the repository root (no wall-clock limit: a slow machine passes)."""
    command = [*prefix, sys.executable, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def _assert_clean(result: subprocess.CompletedProcess, *words: str) -> None:
    """Exit code 2, no traceback, an `error:` paragraph holding every one of `words`."""
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    first = result.stderr.strip().splitlines()[0]
    assert ": error: " in first, result.stderr
    for word in words:
        assert word in first, (word, result.stderr)


def _main(workdir: str, *flags: str, config: str = CONFIG) -> subprocess.CompletedProcess:
    return _python("-m", "kiln.main", f"--config={config}", f"--workdir={workdir}", *flags)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, word",
    [
        ("--config.checkpoint.every=0", "checkpoint.every=0"),
        ("--config.eval.every=0", "eval.every=0"),
        ("--config.train.log_every=0", "train.log_every=0"),
        ("--config.checkpoint.keep=-1", "checkpoint.keep=-1"),
        ("--config.checkpoint.keep=0", "checkpoint.keep=0"),
    ],
)
def test_zero_intervals_and_keep_fail_before_the_run(tmp_path, flag, word):
    result = _main(str(tmp_path / "run"), flag)
    _assert_clean(result, word)
    assert not (tmp_path / "run").exists()  # Nothing written for a config that cannot run.


@pytest.mark.slow
def test_bad_workdirs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    _assert_clean(_main(str(a_file)), "is a file")
    _assert_clean(_main(""), "--workdir is empty")
    _assert_clean(_main(str(a_file / "run")), "cannot be created")


def _read_only_prefix(folder: str) -> tuple[str, ...] | None:
    """A command prefix under which `folder` is read-only (root ignores permission bits: a
    read-only bind mount in a new mount namespace), or None where that is not possible."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return ()
    unshare = shutil.which("unshare")
    script = f'mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec "$@"'
    prefix = (unshare or "unshare", "-m", "sh", "-c", script, "sh")
    if unshare and subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
        return prefix
    return None


@pytest.mark.slow
def test_read_only_workdir(tmp_path):
    folder = tmp_path / "read_only"
    folder.mkdir()
    prefix = _read_only_prefix(str(folder))
    if prefix is None:
        pytest.skip("no way to make a directory read-only for root here")
    flags = (f"--config={CONFIG}", f"--workdir={folder}")
    _assert_clean(_python("-m", "kiln.main", *flags, prefix=prefix), "not writable")
    os.chmod(folder, 0o755)


@pytest.mark.slow
def test_bad_experiment_files(tmp_path):
    _assert_clean(_main(str(tmp_path / "r"), config=str(tmp_path / "nope.py")), "does not exist")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return (\n")
    _assert_clean(_main(str(tmp_path / "r"), config=str(broken)), "line 2", "syntax error")
    _assert_clean(_main(str(tmp_path / "r"), config=f"{CONFIG},huge=1"), "'huge' is unknown")
    source = tmp_path / "pretrain"
    source.mkdir()
    config_lib.save_json(config_lib.load_config(CONFIG), source / "config.json")
    finetune = f"experiments/finetune.py:from={source},examples=abc"
    _assert_clean(_main(str(tmp_path / "r"), config=finetune), "examples='abc' is not a number")
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_garbage_config_json_in_the_workdir(tmp_path):
    for garbage in (b"\xff\xfe{garbage", b"[1, 2]", b'{"model": 3}'):
        (tmp_path / "config.json").write_bytes(garbage)
        _assert_clean(_main(str(tmp_path)), "config.json", "not a config.json kiln wrote")


@pytest.mark.slow
def test_sample_rejects_bad_arguments_before_loading(tmp_path):
    sample = ("-m", "kiln.tools.sample", "--workdir", str(tmp_path / "no_run"))
    result = _python(*sample, "--prompt", "x", "--batch-size", "0")
    _assert_clean(result, "--batch-size=0")
    result = _python(*sample, "--prompt", "x", "--output-file", str(tmp_path))
    _assert_clean(result, "is a directory")
    latin1 = tmp_path / "prompts.jsonl"
    latin1.write_bytes('{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    _assert_clean(_python(*sample, "--input-file", str(latin1)), "line 1", "not UTF-8")


@pytest.mark.slow
def test_code_eval_rejects_a_non_utf8_samples_file(tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_bytes(b'{"task_id": "HumanEval/0", "completion": "\xe9"}\n')
    result = _python("-m", "kiln.tools.code_eval", "--samples", str(samples))
    _assert_clean(result, "line 1", "not UTF-8")


@pytest.mark.slow
def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    """The holder takes the lock and waits on its stdin: no sleeping, no timing."""
    workdir = tmp_path / "run"
    hold = "import sys\nfrom kiln import workdir\nwith workdir.lock(sys.argv[1]):\n"
    hold += "    print('locked', flush=True)\n    sys.stdin.read()\n"
    command = [sys.executable, "-c", hold, str(workdir)]
    with subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as p:
        assert p.stdout.readline().strip() == b"locked"
        result = _main(str(workdir))
        p.stdin.close()
        assert p.wait() == 0
    _assert_clean(result, "is in use", f"process {p.pid} on host", "kiln.lock")
    assert not workdir.exists()  # The holder made it, left it empty: removed again.


def test_a_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / workdir_lib.LOCK
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with workdir_lib.lock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with workdir_lib.lock(tmp_path):  # Nested in one process: the same lock.
            pass
        assert lock.exists()
    assert not lock.exists()
    assert f"Taking over the stale lock {lock} of process {dead.pid}" in capsys.readouterr().out


def test_a_lock_of_another_host_is_refused_naming_the_file(tmp_path):
    lock = tmp_path / workdir_lib.LOCK
    lock.write_text(json.dumps({"pid": 4242, "host": "elsewhere", "command": "kiln.main"}))
    with pytest.raises(KilnError) as error, workdir_lib.lock(tmp_path):
        pass
    message = str(error.value)
    assert "process 4242 on host elsewhere" in message and f"delete {lock}" in message
    assert lock.exists()


def test_a_zombie_or_reused_pid_is_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # Exited, not reaped: a zombie.
    assert not workdir_lib._alive(child.pid, None)
    child.wait()
    assert workdir_lib._alive(os.getpid(), None)
    start = workdir_lib._proc_stat(os.getpid())[1]
    if start is not None:
        assert not workdir_lib._alive(os.getpid(), start + 1)  # Another process, same id.


CRASH = """
import sys
from absl import app
from kiln import main, run

def bug(config, workdir):
    raise ZeroDivisionError("a bug")

run.train_and_evaluate = bug
sys.argv = ["kiln.main", "--config", sys.argv[1], "--workdir", sys.argv[2]]
app.run(main.main, flags_parser=main.parse_flags)
"""


@pytest.mark.slow
def test_a_bug_prints_one_paragraph_and_keeps_the_traceback_in_a_log(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    result = _python("-c", CRASH, CONFIG, str(workdir))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "kiln: internal error: ZeroDivisionError: a bug" in result.stderr
    logs = list(workdir.glob("kiln-crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.stderr and "report" in result.stderr
    text = logs[0].read_text()
    assert "Traceback" in text and "ZeroDivisionError: a bug" in text and "command:" in text


def test_a_tool_bug_goes_to_a_log_in_the_temporary_directory(tmp_path, monkeypatch, capsys):
    from kiln.tools import report

    def bug(*args, **kwargs):
        raise KeyError("oops")

    monkeypatch.setattr(report, "write_report", bug)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    assert report.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    (log,) = tmp_path.glob("kiln-crash-report-*.log")
    assert "kiln.tools.report: internal error: KeyError" in err and str(log) in err
    assert "Traceback" not in err and "KeyError: 'oops'" in log.read_text()


# Random input, fixed seeds: every reader of a user's file answers with its value or a
# KilnError, never another exception. (A property test without hypothesis, which kiln does
# not install.)

FIELDS = (
    "model", "family", "train", "steps", "seed", "data", "stages", "select", "points", "name",
    "overrides", "config", "prompt", "input", "id", "task_id", "completion", "step", "pid",
    "host", "token", "proc_start", "a.b", "__class__", "items", "", "validation/perplexity",
    "train/loss",
)  # fmt: skip


def _text(rng) -> str:
    alphabet = "az09=,:./_-@ \u00e9\u2581\U0001f600\\\"'{}[]\n\t\x00"
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(0, 12))))


def _json(rng, depth: int = 0):
    kind = int(rng.integers(0, 7 if depth < 3 else 5))
    if kind == 0:
        return [None, True, False][int(rng.integers(3))]
    if kind == 1:
        return [0, 1, -1, 7, 2**31, -(2**63), 10**30][int(rng.integers(7))]
    if kind == 2:
        return [0.0, -1.5, 3e-4, 1e308, float("nan"), float("inf")][int(rng.integers(6))]
    if kind in (3, 4):
        return _text(rng)
    if kind == 5:
        return [_json(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))]
    keys = [FIELDS[int(rng.integers(len(FIELDS)))] for _ in range(int(rng.integers(0, 5)))]
    return {key if rng.random() < 0.8 else _text(rng): _json(rng, depth + 1) for key in keys}


def _documents(seed: int, count: int = 150, lines: bool = False) -> list[bytes]:
    """Random bytes, random JSON (one value, or JSONL lines), and valid JSON with bytes
    flipped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % 3 == 0:
            out.append(rng.bytes(int(rng.integers(0, 120))))
            continue
        values = [_json(rng) for _ in range(int(rng.integers(1, 4)) if lines else 1)]
        data = "\n".join(json.dumps(v) for v in values).encode()
        if i % 3 == 2 and data:
            at = int(rng.integers(len(data)))
            data = data[:at] + bytes([int(rng.integers(256))]) + data[at + 1 :]
        out.append(data)
    return out


def _only_kiln_errors(read, documents: list[bytes], path) -> None:
    for i, data in enumerate(documents):
        path.write_bytes(data)
        try:
            read(path)
        except KilnError:
            pass
        except Exception as e:  # The property under test.
            pytest.fail(f"document {i} {data[:300]!r}: {type(e).__name__}: {e}")


def test_random_config_json_gives_a_config_or_a_kiln_error(tmp_path):
    _only_kiln_errors(config_lib.load_json, _documents(1), tmp_path / "config.json")
    config = config_lib.load_config(CONFIG)
    workdir = tmp_path / "run"
    workdir.mkdir()
    prepare = lambda path: workdir_lib.prepare(config, str(workdir))  # Resuming against it.
    _only_kiln_errors(prepare, _documents(2, count=60), workdir / "config.json")


def test_random_lock_files_are_taken_over_or_refused(tmp_path):
    def take(path):
        with workdir_lib.lock(tmp_path):
            assert json.loads(path.read_text())["pid"] == os.getpid()

    _only_kiln_errors(take, _documents(3, count=60), tmp_path / workdir_lib.LOCK)


def test_random_experiment_arguments_give_a_config_or_a_kiln_error(tmp_path):
    import numpy as np

    rng = np.random.default_rng(4)
    source = tmp_path / "pretrain"  # A run to fine-tune from: the arguments after it count.
    source.mkdir()
    config_lib.save_json(config_lib.load_config(CONFIG), source / "config.json")
    words = ["size=", "tiny", "small", "style=", "modern", "examples=", "seed=", "lr=", "task="]
    words += ["epochs=", "batch=", "jsonl", "path=", ",", "=", ":", "1", "-3", "1e-3", "1.5"]
    words += ["abc", "nan", "inf", " ", "1e999"]
    for i in range(150):
        pieces = [words[int(j)] for j in rng.integers(len(words), size=int(rng.integers(0, 8)))]
        arg = "".join(pieces) if i % 4 else _text(rng)
        for spec in (f"{CONFIG},{arg}", f"experiments/finetune.py:from={source},{arg}"):
            try:
                config_lib.load_config(spec)
            except KilnError:
                pass
            except Exception as e:  # The property under test.
                pytest.fail(f"{spec!r}: {type(e).__name__}: {e}")


def test_random_prompt_and_sample_files_give_rows_or_a_kiln_error(tmp_path):
    from kiln.tools import code_eval, sample

    documents = _documents(5, lines=True)
    _only_kiln_errors(lambda p: sample.read_prompts(str(p)), documents, tmp_path / "p.jsonl")
    _only_kiln_errors(code_eval.read_samples, documents, tmp_path / "s.jsonl")


def test_random_run_files_give_a_report_or_a_kiln_error(tmp_path):
    from kiln.tools import report

    for name, seed in (("summary.json", 6), ("sweep.json", 7), ("comparison.json", 8)):
        folder = tmp_path / name
        (folder / "a").mkdir(parents=True)
        (folder / "a" / "summary.json").write_text('{"validation/loss": 1.0, "step": 2}')
        target = folder / name if name != "summary.json" else folder / "a" / name
        load = lambda _, folder=folder: report.load(str(folder))
        _only_kiln_errors(load, _documents(seed, 60), target)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"validation/loss": 1.0, "step": 2}')

    def read(_):
        (finished,) = report.load(str(run)).runs
        report.curve(finished, "train/loss")
        report._last_step(finished)

    _only_kiln_errors(read, _documents(9, 60, lines=True), run / "metrics.jsonl")
