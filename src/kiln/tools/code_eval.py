"""Code-generation evaluation by execution: HumanEval problems, sandboxed runs, pass@k.

Each completion is appended to its problem's prompt, followed by the problem's unit tests, and
the resulting program runs in its own Python process (``python -I``, started by
``sandbox_child.py`` in a new session and process group) with:

* a fresh temporary directory as working directory, removed afterwards;
* a wall-clock timeout, after which every process the program started is killed;
* resource limits: address space, CPU seconds, file size, no core files, few processes;
* where the machine allows them: a PID namespace (all its processes, daemons included, die with
  it; nothing outside is visible or can be signalled), a mount namespace in which everything
  but the working directory is read-only, a network namespace, and, when the evaluator runs as
  root, uid/gid 65534 for the program (so the process cap holds and root's files and processes
  are out of reach); otherwise the fallbacks of ``sandbox_protections`` (subreaper tracking,
  a socket guard);
* a minimal environment (PATH, LANG) and no stdin.

``sandbox_protections()`` says which protections are in force on this machine (logged by
``evaluate``, printed by the CLI); docs/reliability.md says what each guards against.

Usage: ``python -m kiln.tools.code_eval --samples samples.jsonl [--k 1,10] [--timeout 10]``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import logging
import math
import os
import pathlib
import sys
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kiln.data import corpus
from kiln.errors import KilnError
from kiln.tools import cli
from kiln.tools.sandbox import (  # noqa: F401 - the sandbox's API is code_eval's too
    FILE_SIZE_MB,
    STATUSES,
    Outcome,
    _check_limits,
    _probe,
    _run,
    describe_protections,
    network_isolation,
    run_program,
    sandbox_protections,
)

HUMANEVAL_FILE = "HumanEval.jsonl.gz"
_SAMPLE_EXAMPLE = '{"task_id": "HumanEval/0", "completion": "    return 1\\n"}'
PROBLEM_FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem: the prompt to complete and the tests that check it."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


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
    try:
        with gzip.open(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    problems.append(_problem(line, path, number))
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise KilnError(
            f"HumanEval file {path} cannot be read ({e}): it is not gzip-compressed UTF-8"
            f" JSONL. Restore {HUMANEVAL_FILE} (data/README.md says where it comes from)."
        ) from None
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
    LOG.info("code sandbox protections: %s", describe_protections())
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
    samples = []
    for number, sample in cli.read_jsonl(path, "--samples", _SAMPLE_EXAMPLE):
        if not (
            isinstance(sample.get("task_id"), str) and isinstance(sample.get("completion"), str)
        ):
            raise KilnError(
                f"{path} line {number} must be an object with string fields "
                f'"task_id" and "completion", e.g. {_SAMPLE_EXAMPLE}.'
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
    return cli.run("kiln.tools.code_eval", lambda: _cli(args))


def _cli(args: argparse.Namespace) -> None:
    """Evaluate the samples named by ``args``, print the table and write the results file."""
    ks = parse_ks(args.k)
    samples = read_samples(args.samples)
    output = results_path(args.samples)
    cli.check_output_file(str(output), "")  # Before the programs run, not after.
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
    _write_results(output, samples, summary["results"])
    print(
        f"HumanEval: {summary['problems']} problems, {summary['n']} samples each (fewest), "
        f"sandbox: {describe_protections()}"
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
    lines = []
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
        lines.append(json.dumps(record) + "\n")
    cli.write_text(str(path), "".join(lines), "")


if __name__ == "__main__":
    sys.exit(main())
