"""How every kiln command line ends on a failure. An expected one (a `KilnError`: bad input, a
workdir in use, a missing file) is one paragraph on stderr and exit code 2. Anything else is a
bug: one paragraph naming the exception and a log file that holds the full traceback (in the
workdir where there is one, else the temporary directory), and exit code 1. Ctrl-C is exit
code 130 with one line.

Imports nothing heavy (no jax): `kiln.main` imports it before the host-memory setting.
"""

import datetime
import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

from kiln.errors import KilnError

REPORT_TO = "the kiln issue tracker (with the log file and the command you ran)"


def one_paragraph(text: str) -> str:
    """`text` with every run of whitespace (newlines included) made one space."""
    return " ".join(str(text).split())


def run(prog: str, body: Callable[[], int | None], log_dir: str | None = None) -> int:
    """Runs `body` and returns its exit code (None = 0), turning what it raises into the
    failure paragraphs of the module docstring. `log_dir` holds a crash log if writable."""
    try:
        return body() or 0
    except KilnError as e:
        print(f"{prog}: error: {one_paragraph(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; re-run the same command to resume or redo.", file=sys.stderr)
        return 130
    except Exception as e:
        return crash(prog, e, log_dir)


def crash(prog: str, error: BaseException, log_dir: str | None = None) -> int:
    """Writes `error`'s traceback to a log file, prints where it is in one paragraph and
    returns exit code 1."""
    path = write_log(prog, error, log_dir)
    what = f"{type(error).__name__}: {one_paragraph(str(error))[:300]}".rstrip(": ")
    where = (
        f"The full traceback is in {path}"
        if path
        else "No log file could be written, so here is the traceback:\n"
        + "".join(traceback.format_exception(error))
    )
    print(
        f"{prog}: internal error: {what}. This is not a failure kiln knows how to explain, so it"
        f" is probably a bug in kiln or a library it uses. {where}. Please report it to"
        f" {REPORT_TO}.",
        file=sys.stderr,
    )
    return 1


def write_log(prog: str, error: BaseException, log_dir: str | None = None) -> str | None:
    """A new crash log in `log_dir` (if it is a writable directory) or the temporary
    directory, holding the command line, versions and `error`'s traceback; None if neither
    can be written."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"kiln-crash-{prog.rsplit('.', 1)[-1]}-{stamp}-{os.getpid()}.log"
    text = (
        f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\ntime: {stamp}\n"
        f"python: {sys.version.split()[0]}\n{_versions()}\n\n"
        + "".join(traceback.format_exception(error))
    )
    dirs = [d for d in (log_dir, tempfile.gettempdir()) if d and os.path.isdir(d)]
    for folder in dirs:
        path = os.path.join(folder, name)
        try:
            with open(path, "x", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return None


def _versions() -> str:
    """The versions of the libraries already imported (importing more could fail too)."""
    names = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "grain")
    found = [
        f"{n} {getattr(sys.modules[n], '__version__', '?')}" for n in names if n in sys.modules
    ]
    return "versions: " + (", ".join(found) or "-")


def define_config_flag() -> Any:
    """Defines `--config experiments/<file>.py[:args]` (absl, with `--config.a.b=value`
    overrides, locked) loaded by `config_lib.load_config`: a missing file, a syntax error or a
    bad argument is then a KilnError naming the file and line, not a traceback."""
    from absl import flags
    from ml_collections import config_flags

    from kiln import config_lib

    class _Parser(flags.ArgumentParser):
        def parse(self, argument: str) -> Any:
            return config_lib.load_config(argument)

        def flag_type(self) -> str:
            return "config object"

    holder = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file.", lock_config=True
    )
    flags.FLAGS[holder.name].parser = _Parser()
    return holder


def parse_flags(argv: list[str], prog: str, usage: str) -> list[str]:
    """absl flag parsing with every mistake as one paragraph and exit code 2: the config
    file's own errors as they are, others (unknown key, wrong type) after "bad command line"."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except KilnError as e:
        message = one_paragraph(str(e))
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = f"bad command line: {_unwrap(e)}"
    print(f"{prog}: error: {message}\n{usage}", file=sys.stderr)
    sys.exit(2)


def _unwrap(error: BaseException) -> str:
    """ml_collections wraps messages in reprs and newlines; unwrap them into one line."""
    import ast

    text = str(error)
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (ValueError, SyntaxError):
            pass
    return one_paragraph(text.replace("\\n", " "))


def _label(path: str | os.PathLike, flag: str) -> str:
    return f"{flag}={path}" if flag else str(path)


def read_jsonl(path: str | os.PathLike, flag: str, example: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of the JSONL file `path` (given as
    `flag`, e.g. "--input-file"; "" for none); a KilnError naming it and the line if the file
    is missing, not UTF-8, or a line is not a JSON object (`example` shows a valid one)."""
    from kiln.data import corpus

    label = _label(path, flag)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise KilnError(f"{label} is a directory; give a JSONL file.") from None
    except FileNotFoundError:
        raise KilnError(f"{label}: no such file.") from None
    except OSError as e:
        raise KilnError(f"{label} cannot be read: {e.strerror or e}.") from None
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise KilnError(
                f"{label}, line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column"
                f" {e.start + 1}). Save the file as UTF-8, one JSON object a line, e.g. {example}."
            ) from None
        if line.strip():
            try:
                rows.append((number, corpus.json_object(label, number, line, example)))
            except RecursionError:
                raise KilnError(f"{label}, line {number}: JSON nested too deeply.") from None
    return rows


def check_output_file(path: str, flag: str) -> None:
    """Raises a KilnError unless `path` (given as `flag`) can be written as a file, creating
    its folder: named, not a directory, in a folder that exists or can be made, writable."""
    label = _label(path, flag)
    if not path.strip():
        raise KilnError(f"{flag or 'the output file'} is empty: give the file to write.")
    full = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(full):
        raise KilnError(f"{label} is a directory; give a file name (e.g. inside it).")
    folder = os.path.dirname(full)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise KilnError(
            f"{label}: its folder {folder} cannot be created ({e.strerror or e}). Give a path"
            " in a folder you can write to."
        ) from None
    if not os.access(folder, os.W_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise KilnError(f"{label} is not writable; give a path you can write to.")


def write_text(path: str, text: str, flag: str) -> None:
    """Writes `text` to `path` (UTF-8; given as `flag`), a KilnError if that fails."""
    try:
        with open(os.path.expanduser(path), "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise KilnError(
            f"{_label(path, flag)}: writing failed ({e.strerror or e}). Free some space or give"
            " another path, then re-run."
        ) from None
