"""Code-generation evaluation by execution: HumanEval problems, sandboxed runs, pass@k.

Each completion is appended to its problem's prompt, followed by the problem's unit tests, and
the resulting program runs in its own Python process (``python -I``) with:

* a fresh temporary directory as working directory, removed afterwards;
* a wall-clock timeout, after which the whole process group is killed;
* resource limits: address space, CPU seconds, file size, no core files, few processes;
* no network: new user + network namespaces where the kernel allows them (only a loopback
  interface that is down), otherwise a best-effort guard that disables the ``socket`` module;
* a minimal environment (PATH, LANG) and no stdin.

This keeps honest mistakes (infinite loops, memory hogs, stray files, fork bombs) from hurting
the evaluator. It is not a security boundary against deliberately hostile code.

Usage: ``python -m kiln.tools.code_eval --samples samples.jsonl [--k 1,10] [--timeout 10]``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from kiln.data import corpus
from kiln.errors import KilnError
from kiln.tools import sandbox_child

HUMANEVAL_FILE = "HumanEval.jsonl.gz"
_SAMPLE_EXAMPLE = '{"task_id": "HumanEval/0", "completion": "    return 1\\n"}'
PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
STATUSES = ("passed", "failed", "timeout")
PROGRAM_FILE = sandbox_child.PROGRAM_FILE  # what the child runs from its working directory
STDERR_FILE = "stderr.txt"
DETAIL_CHARS = 400
FILE_SIZE_MB = 16  # RLIMIT_FSIZE: the largest file (stderr included) a program may write

# Run by file path: ``python -I`` with a minimal environment need not be able to import kiln.
CHILD = sandbox_child.__file__


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem: the prompt to complete and the tests that check it."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


@dataclass(frozen=True)
class Outcome:
    """The result of running one program: its status and a short explanation."""

    passed: bool
    status: str  # one of STATUSES
    detail: str  # the tail of stderr, or why the run failed


def load_humaneval(data_dir: str | os.PathLike | None = None) -> list[Problem]:
    """Return the 164 HumanEval problems from ``HumanEval.jsonl.gz`` in the data folder."""
    root, origin = corpus.data_root(data_dir)
    path = root / HUMANEVAL_FILE
    if not path.is_file():
        raise KilnError(
            f"HumanEval file not found: {path} (data folder from {origin}). Put "
            f"{HUMANEVAL_FILE} there or point --data-dir / KILN_DATA_DIR at a folder with it."
        )
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                problems.append(_problem(line, path, number))
    return problems


def _problem(line: str, path: pathlib.Path, number: int) -> Problem:
    """Parse one JSON line of the HumanEval file into a Problem."""
    record = corpus.json_object(path, number, line, "a HumanEval record")
    missing = [name for name in PROBLEM_FIELDS if not isinstance(record.get(name), str)]
    if missing:
        raise KilnError(
            f"{path} line {number} lacks the text field(s) {', '.join(missing)}; "
            f"every HumanEval record needs {', '.join(PROBLEM_FIELDS)}."
        )
    return Problem(**{name: record[name] for name in PROBLEM_FIELDS})


def program(problem: Problem, completion: str) -> str:
    """Return the program that checks ``completion``: prompt, completion, tests, check call."""
    return (
        problem.prompt
        + completion
        + "\n\n"
        + problem.test
        + "\n\n"
        + f"check({problem.entry_point})\n"
    )


def run_program(source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run ``source`` in a sandboxed child process; passed iff it exits 0 within ``timeout_s``."""
    return _run(source, timeout_s=timeout_s, memory_mb=memory_mb, mode="run")


@functools.cache
def network_isolation() -> str:
    """Return how children are cut off from the network here: "namespace" or "socket guard"."""
    result = subprocess.run(
        _command("report", memory_mb=0, cpu_s=0),
        env=_child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    mechanism = result.stdout.strip()
    if result.returncode != 0 or mechanism not in ("namespace", "socket guard"):
        raise KilnError(
            f"Could not start a sandboxed Python child ({sys.executable} -I): exit code "
            f"{result.returncode}, stderr: {result.stderr.strip()[-DETAIL_CHARS:]!r}."
        )
    return mechanism


def _run(source: str, *, timeout_s: float, memory_mb: int, mode: str) -> Outcome:
    """Run ``source`` with the sandbox child in ``mode`` ("run" or "guard"); classify the exit."""
    _check_limits(timeout_s, memory_mb)
    cpu_s = math.ceil(timeout_s) + 1
    with tempfile.TemporaryDirectory(prefix="kiln-code-", ignore_cleanup_errors=True) as tmp:
        folder = pathlib.Path(tmp)
        (folder / PROGRAM_FILE).write_text(source, encoding="utf-8")
        with open(folder / STDERR_FILE, "w+b") as stderr:
            # stdout goes to /dev/null: nothing reads it, so a flood can neither block the child
            # on a full pipe nor fill the disk (RLIMIT_FSIZE does not apply to devices).
            process = subprocess.Popen(
                _command(mode, memory_mb=memory_mb, cpu_s=cpu_s),
                cwd=tmp,
                env=_child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
            timed_out = False
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # Also after a normal exit: grandchildren it left behind must not outlive it.
                _kill_group(process.pid)
                process.wait()
            tail = _tail(stderr)
            if stderr.tell() >= FILE_SIZE_MB << 20:
                tail = _join(f"stderr reached the {FILE_SIZE_MB} MiB file-size limit", tail)
    return _outcome(process.returncode, timed_out, tail, timeout_s)


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    """Raise KilnError unless the timeout and memory limit are positive."""
    if not isinstance(timeout_s, int | float) or not 0 < timeout_s < math.inf:
        raise KilnError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}.")
    if not isinstance(memory_mb, int) or memory_mb < 32:
        raise KilnError(
            f"memory_mb must be an integer of at least 32 (MiB of address space for the child "
            f"Python process), got {memory_mb!r}."
        )


def _command(mode: str, *, memory_mb: int, cpu_s: int) -> list[str]:
    """Return the argv that starts the sandbox child in an isolated-mode interpreter."""
    limits = [str(memory_mb), str(cpu_s), str(FILE_SIZE_MB)]
    return [sys.executable, "-I", CHILD, mode, *limits]


def _child_env() -> dict[str, str]:
    """Return the child's minimal environment: PATH and LANG, nothing else."""
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group ``pgid``, if any is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(file: BinaryIO) -> str:
    """Return the last few hundred characters of an open binary file, decoded leniently."""
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 4 * DETAIL_CHARS))
    text = file.read().decode("utf-8", errors="replace").strip()
    return text[-DETAIL_CHARS:]


def _outcome(returncode: int, timed_out: bool, tail: str, timeout_s: float) -> Outcome:
    """Classify a finished child by how it ended."""
    if timed_out:
        return Outcome(False, "timeout", _join(f"timed out after {timeout_s:g} s", tail))
    if returncode == 0:
        return Outcome(True, "passed", tail)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Outcome(False, "failed", _join(f"killed by {name}", tail))
    return Outcome(False, "failed", tail or f"exit code {returncode}")


def _join(reason: str, tail: str) -> str:
    """Return ``reason``, followed by the stderr tail when there is one."""
    return f"{reason}; stderr: {tail}" if tail else reason


def pass_at_k(n: int, c: int, k: int) -> float:
    """Return the unbiased pass@k estimate for ``c`` correct of ``n`` samples (Chen et al., 2021).

    1 - C(n-c, k) / C(n, k), computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) for stability.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise KilnError(f"pass_at_k needs non-negative integers, got {name}={value!r}.")
    if k < 1 or k > n:
        raise KilnError(f"pass_at_k needs 1 <= k <= n, got k={k} with n={n} samples.")
    if c > n:
        raise KilnError(f"pass_at_k got more correct samples (c={c}) than samples (n={n}).")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate(
    problems: Sequence[Problem],
    completions: Mapping[str, Sequence[str]],
    *,
    ks: Sequence[int] = (1, 10),
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
) -> dict:
    """Run every completion of every problem and return pass@k averaged over the problems.

    ``completions`` maps each task_id of ``problems`` (all of them, no others) to its samples.
    Returns {"pass@k": float for each k in ``ks`` with k <= n, "n": the smallest number of
    samples per problem, "problems": count, "results": {task_id: [Outcome, ...]}}; a k larger
    than n is left out, since pass@k cannot be estimated from fewer than k samples.
    """
    _check_request(problems, completions, ks)
    _check_limits(timeout_s, memory_mb)
    workers = (os.cpu_count() or 1) if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise KilnError(f"workers must be a positive integer, got {workers!r}.")
    jobs = [(p.task_id, program(p, text)) for p in problems for text in completions[p.task_id]]
    run = functools.partial(run_program, timeout_s=timeout_s, memory_mb=memory_mb)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(run, [source for _, source in jobs]))
    results: dict[str, list[Outcome]] = {p.task_id: [] for p in problems}
    for (task_id, _), outcome in zip(jobs, outcomes):
        results[task_id].append(outcome)
    n = min(len(samples) for samples in results.values())
    summary: dict = {}
    for k in sorted(set(ks)):
        if k <= n:
            scores = [pass_at_k(len(o), sum(x.passed for x in o), k) for o in results.values()]
            summary[f"pass@{k}"] = sum(scores) / len(scores)
    summary.update(n=n, problems=len(problems), results=results)
    return summary


def _check_request(
    problems: Sequence[Problem], completions: Mapping[str, Sequence[str]], ks: Sequence[int]
) -> None:
    """Raise KilnError unless the completions cover exactly the problems and ks are valid."""
    if not problems:
        raise KilnError("evaluate() got no problems; pass a non-empty list of Problem.")
    known = [problem.task_id for problem in problems]
    if len(set(known)) != len(known):
        twice = sorted({task_id for task_id in known if known.count(task_id) > 1})
        raise KilnError(f"evaluate() got duplicate problems {', '.join(map(repr, twice[:5]))}.")
    unknown = [task_id for task_id in completions if task_id not in set(known)]
    if unknown:
        raise KilnError(
            f"Completions for unknown task_id(s) {', '.join(map(repr, unknown[:5]))}; the "
            f"problems given are e.g. {', '.join(map(repr, known[:5]))}. Check the task_ids, "
            "or pass the problems they belong to."
        )
    lacking = [task_id for task_id in known if not completions.get(task_id)]
    if lacking:
        raise KilnError(
            f"No completions for {len(lacking)} of the {len(known)} problems, e.g. "
            f"{', '.join(map(repr, lacking[:5]))}. Give at least one completion per problem, "
            "or pass only the problems you have completions for."
        )
    for task_id in known:
        if isinstance(completions[task_id], str):
            raise KilnError(
                f"The completions of {task_id!r} are a string; give a list of strings "
                "(one per sample)."
            )
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad or not ks:
        raise KilnError(f"ks must be positive integers such as (1, 10), got {tuple(ks)!r}.")


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Return the samples of a JSONL file with one {"task_id", "completion"} object a line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise KilnError(f"Samples file not found: {path}.")
    samples = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            sample = corpus.json_object(path, number, line, _SAMPLE_EXAMPLE)
            if not (
                isinstance(sample.get("task_id"), str) and isinstance(sample.get("completion"), str)
            ):
                raise KilnError(
                    f"{path} line {number} must be an object with string fields "
                    '"task_id" and "completion".'
                )
            samples.append(sample)
    if not samples:
        raise KilnError(f"{path} holds no samples; write one JSON object a line.")
    return samples


def results_path(samples_path: str | os.PathLike) -> pathlib.Path:
    """Return where the CLI writes per-sample results: ``<samples>_results.jsonl``."""
    path = pathlib.Path(samples_path)
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}_results.jsonl")


def parse_ks(text: str) -> list[int]:
    """Parse a comma-separated list of positive integers such as "1,10"."""
    try:
        ks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise KilnError(f"--k must be a comma-separated list of positive integers, got {text!r}.")
    return ks


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: evaluate a HumanEval samples file and print pass@k."""
    parser = argparse.ArgumentParser(
        prog="python -m kiln.tools.code_eval", description="HumanEval pass@k by executing samples."
    )
    parser.add_argument("--samples", required=True, help="JSONL of {task_id, completion} lines")
    parser.add_argument("--k", default="1,10", help="comma-separated k values (default 1,10)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    parser.add_argument("--memory-mb", type=int, default=1024, help="address space per program")
    parser.add_argument("--workers", type=int, default=None, help="parallel programs (CPUs)")
    parser.add_argument("--data-dir", default=None, help="folder with HumanEval.jsonl.gz")
    args = parser.parse_args(argv)
    try:
        _cli(args)
    except KilnError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _cli(args: argparse.Namespace) -> None:
    """Evaluate the samples named by ``args``, print the table and write the results file."""
    ks = parse_ks(args.k)
    samples = read_samples(args.samples)
    completions: dict[str, list[str]] = {}
    for sample in samples:
        completions.setdefault(sample["task_id"], []).append(sample["completion"])
    problems = [p for p in load_humaneval(args.data_dir) if p.task_id in completions]
    if not problems:
        raise KilnError(
            f"None of the task_ids in {args.samples} is a HumanEval problem "
            f"(e.g. {next(iter(completions))!r}); HumanEval ids look like 'HumanEval/0'."
        )
    summary = evaluate(
        problems,
        completions,
        ks=ks,
        timeout_s=args.timeout,
        memory_mb=args.memory_mb,
        workers=args.workers,
    )
    output = results_path(args.samples)
    _write_results(output, samples, summary["results"])
    print(
        f"HumanEval: {summary['problems']} problems, {summary['n']} samples each (fewest), "
        f"network isolation: {network_isolation()}"
    )
    print(f"{'metric':<10}{'score':>8}")
    for k in sorted(set(ks)):
        score = summary.get(f"pass@{k}")
        shown = f"{score:8.4f}" if score is not None else f"  (needs >= {k} samples a problem)"
        print(f"{f'pass@{k}':<10}{shown}")
    print(f"results: {output}")


def _write_results(
    path: pathlib.Path, samples: list[dict], results: Mapping[str, list[Outcome]]
) -> None:
    """Write each sample with its passed/status/detail, in the order of the samples file."""
    seen: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as file:
        for sample in samples:
            index = seen.get(sample["task_id"], 0)
            seen[sample["task_id"]] = index + 1
            outcome = results[sample["task_id"]][index]
            record = {
                **sample,
                "passed": outcome.passed,
                "status": outcome.status,
                "detail": outcome.detail,
            }
            file.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
