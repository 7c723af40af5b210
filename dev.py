#!/usr/bin/env python3
"""Set up a local virtual environment and run the demo or the test suite.

    python3 dev.py demo     install into .venv and run `der demo`
    python3 dev.py test     install with test extras into .venv and run the whole suite
                            (in pytest-xdist workers; -n 0 runs it in one process)

Needs only Python 3.11+ (with venv and pip). Arguments after the command are passed on
(`python3 dev.py test -k dispatch`, `python3 dev.py demo --reset-db`).
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PLUGINS = [
    "plugins/der-sdk-sim-bess",
    "plugins/der-sdk-sim-plant",
    "plugins/der-sdk-example-pack",
    "plugins/der-sdk-modbus",
    "plugins/der-sdk-opcua",
    "plugins/der-sdk-postgres",
    "plugins/der-sdk-nats",
    "plugins/der-sdk-ieee2030-5",
    "plugins/der-sdk-openadr",
]


def _python() -> Path:
    return BIN / ("python.exe" if os.name == "nt" else "python")


def _fingerprint() -> str:
    """What an install depends on: each pyproject.toml, and the module each reads its
    version from (a new version reinstalls, so installed metadata shows it)."""
    digest = hashlib.sha256()
    for project in [ROOT, *(ROOT / p for p in PLUGINS)]:
        pyproject = (project / "pyproject.toml").read_text(encoding="utf-8")
        digest.update(pyproject.encode())
        for module in re.findall(r'attr = "([\w.]+)\.__version__"', pyproject):
            digest.update((project / module.replace(".", "/") / "__init__.py").read_bytes())
    return digest.hexdigest()


def ensure_venv(extras: str) -> None:
    """Create .venv and install the project and first-party plugins (editable) when the
    project files changed since the last install."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py itself runs on any python3
        sys.exit(f"der-sdk needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not _python().exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".der-sdk-installed"
    fingerprint = _fingerprint()
    if stamp.exists():
        installed_extras, _, installed = stamp.read_text().partition(":")
        if installed == fingerprint and (not extras or extras == installed_extras):
            return
    target = f".[{extras}]" if extras else "."
    cmd = [
        str(_python()),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "-q",
        "-e",
        target,
    ]
    for plugin in PLUGINS:
        cmd += ["-e", plugin]
    print("installing der-sdk and its plugins into .venv (first run takes a minute)", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    stamp.write_text(f"{extras}:{fingerprint}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        ensure_venv("")
        return subprocess.call([str(BIN / "der"), "demo", *rest], cwd=ROOT)
    ensure_venv("test")
    return subprocess.call([str(_python()), "-m", "pytest", *rest], cwd=ROOT)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
