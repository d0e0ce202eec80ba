"""The package's shape: one-way imports, no hidden function-level imports, files of one concern.

The import graph is read from the source with `ast` (every import statement anywhere in a
file, TYPE_CHECKING blocks and function bodies included), so a cycle cannot hide behind a
deferred import. The same graph, collapsed to the subpackages, must be one-way too: the rooms
of README's Design section (errors, quant <- kernels <- model <- tokenizer, formats <- runtime
<- train <- server <- cli).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bitnet_jax"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path):
    """(imported bitnet_jax module, ast node, nested in a function?) for every import."""
    tree = ast.parse(path.read_text(), str(path))
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn) if n is not fn)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from a.b import c` imports module a.b.c when it is one, else names of a.b.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES
                     else node.module for a in node.names]
        for name in names:
            if name.split(".")[0] == "bitnet_jax" and name != "bitnet_jax":
                yield name, node, id(node) in nested


def _graph() -> dict[str, set[str]]:
    return {m: {n for n, _, _ in _imports(p) if n in MODULES} for m, p in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_walk_sees_the_package():
    assert {"bitnet_jax.model.transformer", "bitnet_jax.kernels.dispatch",
            "bitnet_jax.runtime.generate", "bitnet_jax.cli.main"} <= set(MODULES)
    graph = _graph()
    assert "bitnet_jax.model.bitlinear" in graph["bitnet_jax.model.transformer"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "bitnet_jax"


def test_no_import_cycle_between_subpackages():
    rooms: dict[str, set[str]] = {}
    for src, dsts in _graph().items():
        if src == "bitnet_jax":  # the top-level __init__ names the public API of every room
            continue
        rooms.setdefault(_room(src), set()).update(_room(d) for d in dsts if _room(d) != _room(src))
    cycle = _cycle(rooms)
    assert cycle is None, "subpackage cycle: " + " -> ".join(cycle)


def test_function_level_imports_only_defer_optional_dependencies():
    # Allowed only with a comment on the line before saying what heavy dependency is deferred.
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for name, node, nested in _imports(path):
            if nested and "Deferred" not in lines[node.lineno - 2] + lines[node.lineno - 1]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert not bad, "function-level imports without a '# Deferred: <why>' comment:\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("suffix", [".py", ".cc", ".h"])
def test_files_hold_one_concern_each(suffix):
    long = [f"{p.relative_to(PACKAGE.parent)}: {n} lines" for p in sorted(PACKAGE.rglob("*" + suffix))
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines:\n" + "\n".join(long)


# The rooms of README's Design section, in import order (a room imports only rooms before it).
ROOM_ORDER = ("errors", "_lazy", "_version", "quant", "kernels", "model", "tokenizer", "formats",
              "runtime", "train", "server", "cli", "__main__")


def test_rooms_import_only_rooms_before_them():
    # Deferred (function-level) imports count too: a room may not reach upwards at all.
    up = []
    for src, dsts in _graph().items():
        room = _room(src)
        if room == "bitnet_jax":  # the top-level __init__ names the public API of every room
            continue
        for dst in sorted(dsts):
            if ROOM_ORDER.index(_room(dst)) > ROOM_ORDER.index(room):
                up.append(f"{src} imports {dst}")
    assert not up, "imports against the room order:\n" + "\n".join(up)


def test_only_the_cli_imports_the_server():
    importers = {_room(src) for src, dsts in _graph().items()
                 if any(_room(d) == "server" for d in dsts)} - {"server"}
    assert importers <= {"cli"}, f"only the CLI may import the server; so do {importers}"
