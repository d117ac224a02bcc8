"""Sweeps: one run per point of an experiment's `get_sweep()`, each into `<workdir>/<point>/`.

  python -m kiln.tools.sweep --config experiments/gpt/pretrain.py:size=tiny --workdir runs/sweep \
      [--parallel N] [--dry-run | --emit slurm|tpu] [--config.key=value ...]

An experiment file may define `get_sweep(arg)` beside `get_config(arg)`: a list of override
dicts with dotted keys (`[{"optim.lr": 1e-3, "seed": 0}, ...]`), written with `grid`, `zipped`,
`random_search` and `concat`. Every point runs as `python -m kiln.main --config <spec> --workdir
<workdir>/<point_name> --config.<key>=<value> ...` (at most `--parallel` at once, output in the
point's log.txt); `--config.key=value` flags apply to every point. Re-running skips finished
points (summary.json at train.steps) and resumes interrupted ones from their checkpoints.
`--emit` writes a submission script for launch/slurm.sbatch or launch/tpu_vm.sh instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags as absl_flags
from ml_collections import config_flags

from kiln import workdir as workdir_lib
from kiln.errors import KilnError
from kiln.tools import cli, sweep_points
from kiln.tools.sweep_points import (  # noqa: F401 (the builders experiment files call)
    Point,
    concat,
    grid,
    names,
    point_name,
    points,
    random_search,
    zipped,
)

# Running.


def _common(
    flags: list[str], config: ml_collections.ConfigDict, pts: list[Point]
) -> dict[str, str]:
    """`--config.key=value` flags for every point: key -> value text (keys checked)."""
    fields, out = sweep_points.fields_of(config), {}
    for flag in flags:
        key, sep, text = flag.removeprefix("--config.").partition("=")
        if not flag.startswith("--config.") or not sep:
            raise KilnError(
                f"unexpected argument {flag!r}; overrides for every point are --config.key=value."
            )
        sweep_points.check_key(key, fields, f"--config.{key}")
        if any(key in point for point in pts):
            raise KilnError(
                f"--config.{key} is also set by get_sweep(); drop the flag or the sweep axis."
            )
        out[key] = text
    return out


def _overridden(spec: str, common: dict[str, str], fields: dict[str, Any]) -> Any:
    """The config with the common flags applied, parsed by ml_collections' own config flag,
    exactly as kiln.main will parse them."""
    argv = ["kiln.tools.sweep", "--config", spec, *(f"--config.{k}={v}" for k, v in common.items())]
    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except absl_flags.IllegalFlagValueError:  # Parsed left to right: the first one not present.
        key = next(k for k in common if not values[f"config.{k}"].present)
        kind = sweep_points.TYPE_NAMES.get(type(fields[key]), "a value of its type")
        raise KilnError(
            f"--config.{key}={common[key]}: {key} is"
            f" {sweep_points.a_type(fields[key])} field; give {kind}."
        ) from None
    except absl_flags.Error as e:
        raise KilnError(f"bad --config override: {' '.join(str(e).split())}") from None
    return holder.value


def _steps(config: ml_collections.ConfigDict, values: dict[str, Any]) -> dict[str, int]:
    """Stage (or "" for a single run) -> train.steps, with the overrides in `values` applied."""
    stages = list(config.stages) if "stages" in config else [""]
    out = {}
    for stage in stages:
        key = f"{stage}.train.steps" if stage else "train.steps"
        section = config[stage] if stage else config
        out[stage] = int(values.get(key, section.train.steps))
    return out


def _finished(run_dir: str, steps: dict[str, int]) -> bool:
    """Every stage (or the single run) finished: `workdir.run_finished`."""
    return all(workdir_lib.run_finished(os.path.join(run_dir, s), n) for s, n in steps.items())


def command(spec: str, run_dir: str, flags: Sequence[str]) -> list[str]:
    """The kiln.main command line of one point (`flags`: its --config.key=value flags)."""
    return [sys.executable, "-m", "kiln.main", "--config", spec, "--workdir", run_dir, *flags]


def _flags(overrides: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={sweep_points.format_value(v)}" for k, v in overrides.items()]


@dataclasses.dataclass
class _Job:
    name: str
    run_dir: str
    flags: list[str]  # --config.key=value: the common flags, then the point's
    steps: dict[str, int]  # stage ("" for a single run) -> train.steps
    done: bool = False


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def _summary_line(run_dir: str) -> str:
    try:
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return ""
    for key in ("validation/perplexity", "validation/accuracy", "validation/loss"):
        if isinstance(summary.get(key), int | float):
            return f": {key} {summary[key]:.4g}"
    return ""


def _run_all(
    spec: str, jobs: list[_Job], parallel: int
) -> tuple[list[tuple[str, int, str]], list[str]]:
    """Runs the jobs, at most `parallel` at once; returns the failed ones (name, exit code, log)
    and the names of those that stopped before train.steps (train.stop_after)."""
    pending, running, failed, stopped = list(jobs), [], [], []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if parallel > 1:  # Runs sharing a GPU: none may take 75% of its memory up front.
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        while pending or running:
            while pending and len(running) < parallel:
                job = pending.pop(0)
                workdir_lib.make(job.run_dir)
                log_path = os.path.join(job.run_dir, "log.txt")
                cmd = command(spec, job.run_dir, job.flags)
                with open(log_path, "a") as log:
                    log.write(f"$ {shlex.join(cmd)}\n")
                    log.flush()
                    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                n = len(jobs) - len(pending)
                print(f"[{n}/{len(jobs)}] {job.name}: started (log {log_path})", flush=True)
                running.append((job, log_path, proc, time.monotonic()))
            time.sleep(0.2)
            for entry in [e for e in running if e[2].poll() is not None]:
                running.remove(entry)
                job, log_path, proc, start = entry
                took = f"{time.monotonic() - start:.0f}s"
                if proc.returncode:
                    failed.append((job.name, proc.returncode, log_path))
                    print(f"{job.name}: FAILED with exit code {proc.returncode} after {took}")
                elif not _finished(job.run_dir, job.steps):
                    stopped.append(job.name)
                    print(f"{job.name}: stopped before train.steps after {took}", flush=True)
                else:
                    print(f"{job.name}: done in {took}{_summary_line(job.run_dir)}", flush=True)
    except KeyboardInterrupt:
        for _, _, proc, _ in running:
            proc.terminate()
        for _, _, proc, _ in running:
            proc.wait()
        raise KilnError("interrupted; re-run the same command to resume the sweep.") from None
    return failed, stopped


SLURM = "launch/slurm.sbatch"
TPU = "launch/tpu_vm.sh"


def script(kind: str, spec: str, jobs: list[_Job]) -> str:
    """A bash script with one launch/slurm.sbatch (`kind="slurm"`) or launch/tpu_vm.sh
    (`kind="tpu"`, one after another) line per unfinished point."""
    launcher = {"slurm": SLURM, "tpu": TPU}[kind]
    lines = [
        "#!/usr/bin/env bash",
        f"# Sweep of {spec}: one {launcher} run per point.",
        "# Written by kiln.tools.sweep; run it from the repository root.",
        "set -euo pipefail",
        f'if [[ ! -e {launcher} ]]; then echo "run this from the repository root" >&2; exit 2; fi',
    ]
    if kind == "tpu":
        lines += [
            ': "${TPU_NAME:?set TPU_NAME to the TPU VM name}"',
            ': "${ZONE:?set ZONE to the TPU VM zone}"',
        ]
    for job in jobs:
        if job.done:
            lines.append(f"# {job.name}: finished (summary.json at train.steps); skipped")
        elif kind == "slurm":
            out = os.path.join(job.run_dir, "slurm-%j.out")
            head = ["sbatch", f"--job-name={job.name}", f"--output={out}", SLURM]
            lines.append(shlex.join(["mkdir", "-p", job.run_dir]))  # for --output
            lines.append(shlex.join([*head, spec, job.run_dir, *job.flags]))
        else:
            tail = shlex.join(["--", spec, job.run_dir, *job.flags])
            lines.append(f'{TPU} --tpu "$TPU_NAME" --zone "$ZONE" {tail}')
    return "\n".join(lines) + "\n"


def run_sweep(
    spec: str,
    workdir: str,
    parallel: int = 1,
    dry_run: bool = False,
    emit: str = "",
    flags: Sequence[str] = (),
) -> int:
    """Runs (or prints, or writes a script for) every unfinished point; returns the exit code:
    0, or 1 if a point failed."""
    if parallel < 1:
        raise KilnError(f"--parallel={parallel} must be at least 1.")
    if not workdir.strip():
        raise KilnError("--workdir is empty: give the sweep's folder, e.g. --workdir runs/sweep.")
    if emit not in ("", "slurm", "tpu"):
        raise KilnError(f"emit={emit!r}: choose slurm or tpu.")
    config, pts = sweep_points.load_points(spec)
    common = _common(list(flags), config, pts)
    config = _overridden(spec, common, sweep_points.fields_of(config))
    jobs = []
    for name, point in zip(sweep_points.names(pts), pts):
        run_dir = os.path.join(workdir, name)
        job = _Job(name, run_dir, [f"--config.{k}={v}" for k, v in common.items()], {})
        job.flags += _flags(point)
        job.steps = _steps(config, point)
        job.done = _finished(run_dir, job.steps)
        jobs.append(job)
    todo = [job for job in jobs if not job.done]
    if dry_run:
        for job in jobs:
            cmd = command(spec, job.run_dir, job.flags)
            print(f"# {job.name}: finished; skipped" if job.done else shlex.join(cmd))
        return 0
    workdir_lib.make(workdir)
    record = {
        "config": spec,
        "overrides": common,
        "points": [{"name": job.name, "overrides": p} for job, p in zip(jobs, pts)],
    }
    sweep_json = os.path.join(workdir, "sweep.json")
    cli.write_text(sweep_json, json.dumps(record, indent=2), "")
    if emit:
        path = os.path.join(workdir, f"submit_{emit}.sh")
        cli.write_text(path, script(emit, spec, jobs), "")
        os.chmod(path, 0o755)
        print(f"Wrote {path}: {len(todo)} of {len(jobs)} points to launch. Run: bash {path}")
        return 0
    for job in jobs:
        if job.done:
            print(f"{job.name}: finished in {job.run_dir}; skipped")
    failed, stopped = _run_all(spec, todo, parallel)
    for name, code, log_path in failed:
        print(f"\nFAILED {name} (exit code {code}); last lines of {log_path}:\n{_tail(log_path)}")
    if failed:
        print()
    print(
        f"Sweep {workdir}: {len(jobs)} points: {len(todo) - len(failed)} run,"
        f" {len(jobs) - len(todo)} skipped (finished), {len(failed)} failed"
        + (f" ({', '.join(f[0] for f in failed)}; re-run to retry them)" if failed else "")
        + (f", {len(stopped)} stopped early (re-run to continue)" if stopped else "")
        + f".\nNext: python -m kiln.tools.report {shlex.quote(workdir)}",
        flush=True,
    )
    return 1 if failed else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kiln.tools.sweep",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="--config.key=value flags apply to every point.",
    )
    p.add_argument("--config", required=True, help="experiments/<file>.py[:args] with get_sweep()")
    p.add_argument("--workdir", required=True, help="the sweep's folder; one subfolder per point")
    p.add_argument("--parallel", type=int, default=1, help="points running at once (default 1)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    mode.add_argument(
        "--emit", choices=("slurm", "tpu"), help="write <workdir>/submit_<kind>.sh, run nothing"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    sweep = functools.partial(
        run_sweep,
        args.config,
        args.workdir,
        parallel=args.parallel,
        dry_run=args.dry_run,
        emit=args.emit or "",
        flags=rest,
    )
    return cli.run("kiln.tools.sweep", sweep, args.workdir or None)


if __name__ == "__main__":
    sys.exit(main())
