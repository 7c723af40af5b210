"""der_sdk is the ground floor: no module of it imports the reference apps
(der_sdk_headend, der_sdk_agent), not inside a function, not under TYPE_CHECKING, not by
a module name in a string; and its modules import no cycle back into themselves.

The check reads the source with ``ast``, so it sees every import statement wherever it
stands, whether or not that line ever runs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "der_sdk"
APPS = ("der_sdk_headend", "der_sdk_agent")
IMPORT_CALLS = {"import_module", "__import__"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()  # a module's relative imports start from its package
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports (line, dotted name), from anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve(path, node)
            yield node.lineno, module
            for alias in node.names:  # `from der_sdk import cli` imports der_sdk.cli
                yield node.lineno, f"{module}.{alias.name}"
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in IMPORT_CALLS and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    yield node.lineno, first.value


def _core_files() -> list[Path]:
    return sorted(p for p in CORE.rglob("*.py") if "_generated" not in p.parts)


def _is_app(module: str) -> bool:
    return any(module == app or module.startswith(f"{app}.") for app in APPS)


def test_der_sdk_imports_nothing_from_the_apps() -> None:
    found: dict[str, str] = {}  # "file:line" -> the first app module imported there
    for path in _core_files():
        for line, module in _imports(path):
            if _is_app(module):
                found.setdefault(f"{path.relative_to(ROOT)}:{line}", module)
    found_lines = [f"{where}: imports {module}" for where, module in found.items()]
    assert not found_lines, "der_sdk must not import the reference apps:\n" + "\n".join(found_lines)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the der_sdk modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in _core_files()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = {module for _, module in _imports(path) if module in modules}
        # a submodule's import of its own package runs the package first: not a cycle
        graph[name] = imported - {m for m in modules if name == m or name.startswith(f"{m}.")}
    return graph


def _path_back(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A chain of imports from ``start`` back to ``start``, if there is one."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        current = frontier.pop()
        for target in sorted(graph[current]):
            if target == start:
                chain = [current]
                while chain[-1] != start:
                    chain.append(parents[chain[-1]])
                return [start, *reversed(chain[:-1]), start]
            if target not in parents:
                parents[target] = current
                frontier.append(target)
    return None


def test_the_command_line_modules_import_no_cycle() -> None:
    """``der_sdk.cli`` and ``der_sdk.demo`` used to import each other; the command line's
    modules now stand on the rest of der_sdk without being imported back."""
    graph = _import_graph()
    cli_modules = [m for m in graph if m.startswith(("der_sdk.cli", "der_sdk.commands"))]
    assert "der_sdk.cli" in cli_modules
    cycles = [" -> ".join(c) for m in cli_modules if (c := _path_back(graph, m))]
    assert not cycles, "import cycles through the command line:\n" + "\n".join(cycles)


def test_the_check_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    """The import-graph check itself: hidden imports are found, relative ones resolved."""
    package = tmp_path / "der_sdk" / "sub"
    package.mkdir(parents=True)
    source = package / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from der_sdk_headend.service import Headend\n"
        "def f():\n"
        "    import der_sdk_agent.agent\n"
        "    importlib.import_module('der_sdk_headend.config')\n"
        "from .. import plugins\n"
        "from . import sibling\n",
        encoding="utf-8",
    )
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = list(_imports(source))
    finally:
        ROOT = saved
    assert [(line, m) for line, m in found if _is_app(m)] == [
        (3, "der_sdk_headend.service"),
        (3, "der_sdk_headend.service.Headend"),
        (5, "der_sdk_agent.agent"),
        (6, "der_sdk_headend.config"),
    ]
    assert (7, "der_sdk.plugins") in found and (8, "der_sdk.sub.sibling") in found
