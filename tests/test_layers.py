"""The package's import graph: no cycle, and no command importing another command
(commands share ``pipeline.py`` and the library below it instead)."""

import ast
from pathlib import Path

import pytest

from tinyvit158.cli import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "tinyvit158"
OPTIONAL = ("torch", "ray", "grpc", "onnx", "onnxruntime", "onnxscript", "openvino", "nncf")
# modules whose late imports are their point
LATE_BY_DESIGN = {
    "tinyvit158.cli": "the dispatcher imports the one command asked for, so --version stays instant",
    "tinyvit158.bench": "each variant's child process loads only what it runs: the peak memory of each is measured",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(module imported, at top level)`` for every import statement of one file; a
    ``from tinyvit158.x import y`` counts as importing ``tinyvit158.x.y`` when that is a module."""
    out = []
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                known = (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists()
                out.append((sub if known else node.module, id(node) in top))
    return out


GRAPH = {module_name(p): imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def internal(name: str) -> str | None:
    """The tinyvit158 module an import names (its package ``__init__`` when it is one), or None."""
    while name.startswith("tinyvit158"):
        if name in GRAPH:
            return name
        name = name.rsplit(".", 1)[0]
    return None


def test_there_is_no_import_cycle():
    edges = {m: {internal(n) for n, _ in deps} - {None, m} for m, deps in GRAPH.items()}
    for m in edges:  # a module's package __init__ runs first: not an edge back
        edges[m] = {d for d in edges[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(d) :], d]))
            if d not in state:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_imports_no_other_command(command):
    module = COMMANDS[command][0]
    others = {mod for mod, _ in COMMANDS.values()} - {module}
    bad = sorted({internal(n) for n, _ in GRAPH[module]} & others)
    assert not bad, f"{module} imports the command(s) {bad}; move what they share below them (e.g. pipeline.py)"


def test_imports_sit_at_the_top_except_the_optional_extras():
    """An import inside a function hides the graph from a reader; only the optional extras
    (torch, Ray, the bench peers) and the modules that need them are imported late."""
    late = []
    for m, deps in GRAPH.items():
        if m in LATE_BY_DESIGN:
            continue
        for name, at_top in deps:
            if at_top or name.split(".")[0] in OPTIONAL:
                continue
            target = internal(name)
            if target is None or not needs_an_extra(target):
                late.append(f"{m}: {name}")
    assert not late, "imports inside functions: " + ", ".join(late)


def needs_an_extra(module: str, seen=None) -> bool:
    """Whether importing ``module`` imports an optional extra at its top level."""
    seen = seen or set()
    if module in seen:
        return False
    seen.add(module)
    for name, at_top in GRAPH[module]:
        if at_top and (name.split(".")[0] in OPTIONAL or (internal(name) and needs_an_extra(internal(name), seen))):
            return True
    return False
