"""The house rules of docs/architecture.md, read off the source with `ast`: imports form no
circle (function-local imports included), and code outside `models/` never compares a value
with a family's name (it asks the Family table)."""

import ast
import pathlib

from kiln import models

SRC = pathlib.Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of the kiln package."""
    out = {}
    for path in (SRC / "kiln").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(path: pathlib.Path, known: dict[str, pathlib.Path]) -> set[str]:
    """The kiln modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kiln"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` ([] if none), by depth-first search."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return []


def test_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    known = _modules()
    # A package's modules import the package's __init__ implicitly; that is not a circle.
    graph = {
        name: {m for m in _imports(path, known) if m != name and not name.startswith(m + ".")}
        for name, path in known.items()
    }
    assert _cycle(graph) == []


def _family_name_tests(source: str, where: str, names: set[str]) -> list[str]:
    """`x == "gpt"` / `x in ("bert", ...)` comparisons against family names in `source`, as
    `where:line`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        for side in (node.left, *node.comparators):
            values = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
            if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                found.append(f"{where}:{node.lineno}")
    return found


def test_family_names_are_only_tested_in_models():
    names = set(models.FAMILIES)
    outside = [
        path
        for path in (SRC / "kiln").rglob("*.py")
        if "models" not in path.relative_to(SRC / "kiln").parts
    ]
    found = [
        hit
        for path in outside
        for hit in _family_name_tests(path.read_text(), str(path.relative_to(SRC)), names)
    ]
    assert found == []


def test_the_family_check_sees_a_comparison():
    source = 'def f(c):\n    if c.kind in ("a", "t5"):\n        return c.family == "bert"\n'
    assert _family_name_tests(source, "f.py", {"bert", "t5"}) == ["f.py:2", "f.py:3"]
    assert _family_name_tests('x = "bert"\n', "g.py", {"bert"}) == []


# The house's size rules (docs/architecture.md): a module over ~400 lines or a function over
# 80 is a sign to split.
MAX_FILE_LINES = 420
MAX_FUNCTION_LINES = 80


def _oversized(path: pathlib.Path, where: str) -> list[str]:
    """`where` if the file is over MAX_FILE_LINES; `where:name` for each longer function."""
    source = path.read_text()
    found = [where] if source.count("\n") > MAX_FILE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                found.append(f"{where}:{node.name}")
    return found


def test_no_module_or_function_is_oversized():
    found = [
        hit
        for path in sorted((SRC / "kiln").rglob("*.py"))
        for hit in _oversized(path, str(path.relative_to(SRC)))
    ]
    assert found == []


def test_the_size_check_sees_a_long_function(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    path = tmp_path / "long.py"
    path.write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}")
    assert _oversized(path, "long.py") == ["long.py:long"]
    path.write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert _oversized(path, "big.py") == ["big.py"]
