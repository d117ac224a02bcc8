"""The state of a run's checkpoints, read-only and without JAX.

  python -m kiln.tools.checkpoints --verify runs/<name>

RUN is a run's workdir, its `checkpoints/` folder, or a pipeline's workdir (each stage's run).
One line per checkpoint: its step and `ok` (every file matches the checksums kiln recorded at
save) or `damaged: why` (a file missing, truncated or changed; an unreadable record); folders kiln
moved aside (`<step>.damaged`, `<step>.diverged`) and unfinished saves are listed too. Exit code 0
when every checkpoint is intact, 1 when one is damaged, 2 for a bad argument. A run restores
the newest intact checkpoint by itself; this tool only says what it would find
(docs/reliability.md).
"""

import argparse
import os
import sys
from collections.abc import Sequence

from kiln import integrity
from kiln.errors import KilnError
from kiln.tools import cli

PROG = "kiln.tools.checkpoints"
CHECKPOINTS = "checkpoints"  # workdir.CHECKPOINTS, without importing the workdir module's deps


def checkpoint_folders(path: str) -> list[str]:
    """The checkpoints folders under `path`: its own, `path` itself, or each stage's."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise KilnError(
            f"{path} is not a directory. Give a run's workdir, its checkpoints/ folder or a"
            " pipeline's workdir."
        )
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):
        return [os.path.join(path, CHECKPOINTS)]
    if os.path.basename(path) == CHECKPOINTS or any(_step(n) is not None for n in os.listdir(path)):
        return [path]
    stages = sorted(
        os.path.join(path, name, CHECKPOINTS)
        for name in os.listdir(path)
        if os.path.isdir(os.path.join(path, name, CHECKPOINTS))
    )
    if not stages:
        raise KilnError(
            f"{path} holds no checkpoints: no checkpoints/ folder in it or in its stage folders."
            " Point at a run's workdir (it has one once its first checkpoint is saved)."
        )
    return stages


def _step(name: str) -> int | None:
    return int(name) if name.isdigit() else None


def report(folder: str) -> tuple[list[str], int]:
    """(lines describing each entry of a checkpoints folder, how many checkpoints are damaged)."""
    names = sorted(os.listdir(folder), key=lambda n: (_step(n.split(".")[0]) or 0, n))
    lines, damaged = [], 0
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isdir(path):
            continue
        if _step(name) is not None:
            problem = integrity.check(path)
            if problem is not None:
                damaged += 1
                lines.append(f"step {name}: damaged: {problem}")
            elif os.path.exists(os.path.join(path, integrity.RECORD)):
                lines.append(f"step {name}: ok")
            else:
                lines.append(
                    f"step {name}: ok (no checksum record, from an older kiln: parsed only)"
                )
        elif integrity.TMP in name:
            lines.append(f"{name}: an unfinished save (ignored; removed when the run resumes)")
        elif name.split(".")[-1].split("-")[0] in (integrity.DAMAGED, integrity.DIVERGED):
            why = name.split(".")[-1].split("-")[0]
            lines.append(f"{name}: moved aside by kiln ({why}); no run restores it")
    if not lines:
        lines.append("no checkpoints yet")
    return lines, damaged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--verify", metavar="RUN", required=True, help="a run's workdir")
    args = parser.parse_args(argv)
    damaged = 0
    for folder in checkpoint_folders(args.verify):
        lines, bad = report(folder)
        damaged += bad
        print(folder)
        for line in lines:
            print(f"  {line}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(cli.run(PROG, main))
