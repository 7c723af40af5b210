#!/usr/bin/env python3
"""One version for every distribution of the repository: der-sdk and each first-party
plugin under ``plugins/`` are released together under the same version number.

    python scripts/release_version.py check         exit 1 naming each mismatch
    python scripts/release_version.py set 0.2.0     write 0.2.0 everywhere it belongs

Each distribution reads its version from its package's ``__version__`` (the
``[tool.setuptools.dynamic]`` table of its ``pyproject.toml``), so that string is the one
place per distribution. A first-party distribution requires der-sdk, and any other
first-party plugin it builds on, at least at its own version (``der-sdk>=0.1.0``); the hook
policy (docs/hook_policy.md) keeps it working with the releases after. ``set`` rewrites the
``__version__`` strings and those lower bounds; ``check`` is what tests/e2e/test_packaging.py
runs. ``--root`` points both at another copy of the repository.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Distribution:
    """One distribution of the repository, as its ``pyproject.toml`` declares it."""

    name: str
    pyproject: Path
    version_file: Path  # the module whose __version__ is the distribution's version
    version: str
    requirements: tuple[Requirement, ...]  # dependencies and every extra's


def _version_in(module: Path) -> str:
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise SystemExit(f"{module}: no __version__ = '...' string")


def read_distribution(pyproject: Path) -> Distribution:
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    project = data["project"]
    if "version" not in project.get("dynamic", []):
        raise SystemExit(f"{pyproject}: the version must be dynamic, read from __version__")
    attr = data["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    module = attr.rpartition(".")[0]
    version_file = pyproject.parent / module.replace(".", "/") / "__init__.py"
    requirements = [*project.get("dependencies", [])]
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return Distribution(
        name=project["name"],
        pyproject=pyproject,
        version_file=version_file,
        version=_version_in(version_file),
        requirements=tuple(Requirement(r) for r in requirements),
    )


def distributions(root: Path = ROOT) -> list[Distribution]:
    """der-sdk first, then each plugin under ``plugins/`` by name."""
    projects = [root / "pyproject.toml", *sorted(root.glob("plugins/*/pyproject.toml"))]
    return [read_distribution(p) for p in projects]


def problems(root: Path = ROOT) -> list[str]:
    """What breaks the one-version scheme, one line each (empty: nothing)."""
    found = distributions(root)
    version = found[0].version
    names = {d.name for d in found}
    lines: list[str] = []
    try:
        Version(version)
    except InvalidVersion:
        lines.append(f"{found[0].version_file}: {version!r} is not a PEP 440 version")
    for dist in found:
        if dist.version != version:
            lines.append(
                f"{dist.version_file}: {dist.name} is {dist.version}, der-sdk is {version}"
            )
        for req in dist.requirements:
            if req.name in names and str(req.specifier) != f">={version}":
                lines.append(
                    f"{dist.pyproject}: {dist.name} requires {req}; "
                    f"a first-party requirement is {req.name}>={version}"
                )
    return lines


def set_version(version: str, root: Path = ROOT) -> None:
    """Write ``version`` into every ``__version__`` and first-party lower bound."""
    Version(version)  # refuses what PEP 440 does not allow
    found = distributions(root)
    names = "|".join(re.escape(d.name) for d in sorted(found, key=lambda d: -len(d.name)))
    bound = re.compile(rf'"({names})>=[^";]*(;[^"]*)?"')
    for dist in found:
        text = dist.version_file.read_text(encoding="utf-8")
        dist.version_file.write_text(
            re.sub(
                r'^__version__ = "[^"]*"', f'__version__ = "{version}"', text, flags=re.MULTILINE
            ),
            encoding="utf-8",
        )
        text = dist.pyproject.read_text(encoding="utf-8")
        dist.pyproject.write_text(
            bound.sub(lambda m: f'"{m[1]}>={version}{m[2] or ""}"', text), encoding="utf-8"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="exit 1 naming each distribution out of step")
    setter = commands.add_parser("set", help="write one version into every distribution")
    setter.add_argument("version", help="the new version (PEP 440, e.g. 0.2.0)")
    ns = parser.parse_args(argv)
    if ns.command == "set":
        try:
            set_version(ns.version, ns.root)
        except InvalidVersion:
            parser.error(f"{ns.version!r} is not a PEP 440 version")
    lines = problems(ns.root)
    for line in lines:
        print(line, file=sys.stderr)
    if lines:
        return 1
    found = distributions(ns.root)
    print(f"{len(found)} distributions at {found[0].version}: " + ", ".join(d.name for d in found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
