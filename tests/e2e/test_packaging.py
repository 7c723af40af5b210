"""der-sdk installed as users install it: every distribution of the repository builds an
sdist and, from that sdist, a wheel; the wheels go into a fresh virtual environment outside
the repository (dependencies from the package index, through pip's cache), and ``der demo``,
``der plugins``, ``der new-adapter`` and ``der sim`` run there from an empty folder. The
one-version scheme of ``scripts/release_version.py`` is checked here too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest

import der_sdk
from tests.e2e.process_kit import started

ROOT = Path(__file__).resolve().parents[2]

# Building eight distributions and installing them with their dependencies takes a minute
# or two on a 2-core machine; the module's fixtures share that work.
pytestmark = pytest.mark.timeout(900)


def _script(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


release_version = _script("release_version", ROOT / "scripts" / "release_version.py")
DISTRIBUTIONS = release_version.distributions(ROOT)


def run(
    cmd: Sequence[str | Path],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    result = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )
    assert result.returncode == 0, f"{cmd} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout


# --------------------------------------------------------------------------- one version


def test_every_distribution_has_der_sdks_version_and_first_party_lower_bounds() -> None:
    assert release_version.problems(ROOT) == []
    assert {d.version for d in DISTRIBUTIONS} == {der_sdk.__version__}
    names = {d.name for d in DISTRIBUTIONS}
    assert {"der-sdk", "der-sdk-sim-bess", "der-sdk-sim-plant", "der-sdk-modbus"} <= names
    assert {p.parent.name for p in ROOT.glob("plugins/*/pyproject.toml")} == names - {"der-sdk"}


def test_the_changelog_has_a_section_for_the_current_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(der_sdk.__version__)}\] - ", changelog, re.MULTILINE)


def _copy_versioned_files(target: Path) -> None:
    for dist in DISTRIBUTIONS:
        for path in (dist.pyproject, dist.version_file):
            copy = target / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, copy)


def test_release_version_set_moves_every_distribution_and_bound_together(tmp_path: Path) -> None:
    _copy_versioned_files(tmp_path)
    script = ROOT / "scripts" / "release_version.py"
    out = run([sys.executable, script, "--root", tmp_path, "set", "0.2.0"])
    assert f"{len(DISTRIBUTIONS)} distributions at 0.2.0" in out
    moved = release_version.distributions(tmp_path)
    assert {d.version for d in moved} == {"0.2.0"}
    opcua = next(d for d in moved if d.name == "der-sdk-opcua")
    assert {str(r) for r in opcua.requirements} >= {"der-sdk>=0.2.0", "der-sdk-sim-bess>=0.2.0"}


def test_dev_py_reinstalls_when_the_version_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copy_versioned_files(tmp_path)
    dev = _script("dev", ROOT / "dev.py")
    monkeypatch.setattr(dev, "ROOT", tmp_path)
    before = dev._fingerprint()
    init = tmp_path / "plugins/der-sdk-sim-plant/der_sdk_sim_plant/__init__.py"
    init.write_text(init.read_text().replace(der_sdk.__version__, "0.2.0"))  # no pyproject
    assert dev._fingerprint() != before


def test_release_version_check_names_a_distribution_out_of_step(tmp_path: Path) -> None:
    _copy_versioned_files(tmp_path)
    init = tmp_path / "plugins/der-sdk-nats/der_sdk_nats/__init__.py"
    init.write_text(init.read_text().replace(der_sdk.__version__, "9.9.9"))
    pyproject = tmp_path / "plugins/der-sdk-modbus/pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"der-sdk>=', '"der-sdk>=0.0.1,<'))
    script = ROOT / "scripts" / "release_version.py"
    result = subprocess.run(
        [sys.executable, script, "--root", tmp_path, "check"], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert f"der-sdk-nats is 9.9.9, der-sdk is {der_sdk.__version__}" in result.stderr
    assert "der-sdk-modbus requires der-sdk<" in result.stderr


def test_release_version_refuses_a_version_pep_440_does_not_allow(tmp_path: Path) -> None:
    _copy_versioned_files(tmp_path)
    script = ROOT / "scripts" / "release_version.py"
    result = subprocess.run(
        [sys.executable, script, "--root", tmp_path, "set", "one"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "'one' is not a PEP 440 version" in result.stderr
    assert {d.version for d in release_version.distributions(tmp_path)} == {der_sdk.__version__}


# --------------------------------------------------------------------------- builds


@dataclass(frozen=True)
class Built:
    sdist: Path
    wheel: Path


# what a build never reads: the checkout's caches, environments and earlier builds, and for
# der-sdk the folders beside its packages
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*_cache", "der-data"
)
NOT_DER_SDK = shutil.ignore_patterns("plugins", "tests", "bench", "docs")


def _build(dist_dir: Path, source: Path, out: Path) -> None:
    """Build ``dist_dir`` from a copy in ``source`` (so the checkout is left as it was; its
    symbolic links stay links): the sdist first, then the wheel from the unpacked sdist,
    build's default, so a file the sdist forgot is missing from the wheel too. No
    isolation: the test extras carry setuptools and wheel, nothing is downloaded."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = NOT_SOURCES(folder, names)
        return skipped | NOT_DER_SDK(folder, names) if Path(folder) == ROOT else skipped

    shutil.copytree(dist_dir, source, symlinks=True, ignore=ignore)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, source])


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    pytest.importorskip("build", reason="needs the test extras (build, setuptools, wheel)")
    out = tmp_path_factory.mktemp("dist")
    sources = tmp_path_factory.mktemp("sources")
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(_build, d.pyproject.parent, sources / d.name, out) for d in DISTRIBUTIONS
        ]
        for job in jobs:
            job.result()
    artefacts: dict[str, Built] = {}
    for dist in DISTRIBUTIONS:
        stem = f"{dist.name.replace('-', '_')}-{dist.version}"
        (sdist,) = out.glob(f"{stem}.tar.gz")
        (wheel,) = out.glob(f"{stem}-py3-none-any.whl")
        artefacts[dist.name] = Built(sdist=sdist, wheel=wheel)
    return artefacts


# examples/ of the repository holds more than the demo's fleets: scripts to run in a clone
# and an example program-source plugin to install from a clone
NOT_PACKAGE_DATA = (
    "der_sdk_headend/examples/cluster/",
    "der_sdk_headend/examples/programs/",
)


def _package_files(dist_dir: Path, packages: list[str]) -> set[str]:
    """Every file of the distribution's packages, symbolic links followed, as a wheel
    names it; caches and :data:`NOT_PACKAGE_DATA` left out."""
    found: set[str] = set()
    for package in packages:
        for folder, dirs, files in os.walk(dist_dir / package, followlinks=True):
            dirs[:] = [d for d in dirs if not d.endswith(("__pycache__", "_cache"))]
            for name in files:
                path = Path(folder, name).relative_to(dist_dir).as_posix()
                if not path.startswith(NOT_PACKAGE_DATA):
                    found.add(path)
    return found


def _top_packages(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return sorted(
            {n.split("/")[0] for n in archive.namelist() if ".dist-info/" not in n.split("/")[0]}
        )


def test_every_distribution_builds_an_sdist_and_from_it_a_wheel_with_all_its_files(
    built: dict[str, Built],
) -> None:
    for dist in DISTRIBUTIONS:
        wheel = built[dist.name].wheel
        packages = _top_packages(wheel)
        assert packages, f"{wheel.name} holds no package"
        with zipfile.ZipFile(wheel) as archive:
            in_wheel = set(archive.namelist())
        missing = _package_files(dist.pyproject.parent, packages) - in_wheel
        assert not missing, f"{wheel.name} lacks {sorted(missing)[:10]}"
        with tarfile.open(built[dist.name].sdist) as sdist:
            in_sdist = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
        assert {"pyproject.toml", "README.md"} <= in_sdist, built[dist.name].sdist.name


def test_the_der_sdk_wheel_carries_the_demo_examples_and_the_adapter_template(
    built: dict[str, Built],
) -> None:
    with zipfile.ZipFile(built["der-sdk"].wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"der_sdk-{der_sdk.__version__}.dist-info/METADATA").decode()
    for example in ("assets.yaml", "agent.yaml", "mixed/assets.yaml", "mixed/agent.yaml"):
        assert f"der_sdk_headend/examples/{example}" in names
    assert "der_sdk/.templates/der-adapter/cookiecutter.json" in names
    assert "der_sdk_headend/console/templates/base.html" in names
    assert not any(n.startswith(("tests/", "plugins/", "examples/")) for n in names)
    assert f"Version: {der_sdk.__version__}" in metadata
    assert "Requires-Dist: der-sdk-sim-plant>=" in metadata and 'extra == "demo"' in metadata


# --------------------------------------------------------------------------- installed


@dataclass(frozen=True)
class Installed:
    """A fresh virtual environment holding every wheel, and an empty folder to work in."""

    bin: Path
    home: Path
    env: dict[str, str]

    def der(self, *args: str, timeout: float = 120) -> str:
        return run([self.bin / "der", *args], cwd=self.home, env=self.env, timeout=timeout)

    @contextmanager
    def running(self, *args: str, ready: str, timeout_s: float = 60) -> Iterator[str]:
        """``der ARGS`` in the background: yields its output once it printed ``ready``,
        then stops it with SIGTERM and checks that it exited cleanly."""
        log = self.home / "running.log"
        cmd: list[str | Path] = [self.bin / "der", *args]
        with started(
            cmd, log=log, ready=ready, cwd=self.home, env=self.env, timeout_s=timeout_s
        ) as proc:
            yield log.read_text()
            proc.terminate()
            assert proc.wait(timeout=30) == 0, log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()


def pip_install(python: Path, *args: str | Path, cwd: Path | None = None) -> None:
    """``pip install ARGS`` into the environment of ``python``, by this environment's pip
    (``--python``): the fresh environment is made without pip, whose bundled copy takes half
    a minute to set up on a busy 2-core machine. No byte-compiling, for the same reason."""
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", python, "install", "-q"]
    run([*pip, "--disable-pip-version-check", "--no-compile", *args], cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def installed(built: dict[str, Built], tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("installed")
    assert not base.is_relative_to(ROOT)
    run([sys.executable, "-m", "venv", "--without-pip", base / "venv"])
    bin_dir = base / "venv" / ("Scripts" if os.name == "nt" else "bin")
    # every wheel, their dependencies from the package index (pip's cache keeps them)
    pip_install(bin_dir / "python", *(b.wheel for b in built.values()))
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    env.update({"PYTHONUNBUFFERED": "1", "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"})
    home = base / "empty"
    home.mkdir()
    return Installed(bin=bin_dir, home=home, env=env)


def test_installed_der_is_the_wheels_not_the_repository(installed: Installed) -> None:
    where = run(
        [
            installed.bin / "python",
            "-c",
            "import der_sdk, der_sdk_headend; "
            "print(der_sdk.__file__); print(der_sdk_headend.__file__)",
        ],
        cwd=installed.home,
        env=installed.env,
    ).split()
    for path in where:
        assert Path(path).is_relative_to(installed.bin.parent), path
    assert installed.der("--version").strip() == f"der-sdk {der_sdk.__version__}"


def test_installed_der_plugins_lists_every_first_party_plugin_at_the_one_version(
    installed: Installed,
) -> None:
    rows = json.loads(installed.der("plugins", "--json"))
    versions = {r["package"]: r["version"] for r in rows}
    for dist in DISTRIBUTIONS:
        assert versions.get(dist.name) == der_sdk.__version__, (dist.name, versions)
    provided = {r["package"]: r["provides"] for r in rows}
    assert "sim-pv" in provided["der-sdk-sim-plant"]["adapter_types"]
    assert "modbus" in provided["der-sdk-modbus"]["device_simulators"]


def test_installed_der_demo_runs_from_an_empty_folder_and_stores_telemetry(
    installed: Installed,
) -> None:
    args = ["demo", "--http-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"]
    with installed.running(*args, "--duration", "120", ready="Try:") as banner:
        url = re.search(r"REST API\s+(http://127\.0\.0\.1:\d+)", banner)
        asset = re.search(r"curl \S+/telemetry/([0-9a-f-]{36})\n", banner)
        assert url and asset, banner
        inventory = re.search(r"inventory\s+(\S+)", banner)
        assert inventory, banner
        assert Path(inventory[1]).is_relative_to(installed.bin.parent), "the packaged example"
        assert inventory[1].endswith("der_sdk_headend/examples/mixed/assets.yaml"), banner
        with httpx.Client(base_url=url[1], timeout=5) as http:
            deadline = time.monotonic() + 30
            while not (history := http.get(f"/telemetry/{asset[1]}/history?limit=1").json()):
                assert time.monotonic() < deadline, "no telemetry stored in 30 s"
                time.sleep(0.3)
            assert len(http.get("/assets").json()) == 6, "the mixed example: six assets"
    assert history[0]["asset_id"] == asset[1]
    assert (installed.home / "der-data" / "der.db").is_file()


def test_installed_der_new_adapter_generates_a_plugin_that_installs_and_is_listed(
    installed: Installed,
) -> None:
    installed.der("new-adapter", "acme-meter", "--no-input", "--output", "generated")
    plugin = installed.home / "generated" / "der-sdk-acme-meter"
    assert (plugin / "der_sdk_acme_meter" / "adapter.py").is_file()
    # its wheel built here (the template's build needs setuptools, which the fresh
    # environment need not have), installed there
    wheels = installed.home / "generated-wheels"
    run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", wheels, plugin])
    pip_install(installed.bin / "python", "--no-deps", *wheels.glob("*.whl"))
    rows = json.loads(installed.der("plugins", "--json"))
    assert "acme-meter" in {r["name"] for r in rows}


def test_installed_der_sim_modbus_serves_a_sunspec_device(installed: Installed) -> None:
    args = ["sim", "modbus", "--profile", "sunspec-701", "--port", "0", "--duration", "120"]
    with installed.running(*args, ready="Ctrl-C to stop") as text:
        port = re.search(r"on 127\.0\.0\.1:(\d+) unit 1", text)
        assert port, text
        # read holding registers 40000-40001 (function 3, unit 1): the SunSpec marker
        request = bytes.fromhex("0001 0000 0006 01 03 9c40 0002".replace(" ", ""))
        with socket.create_connection(("127.0.0.1", int(port[1])), timeout=5) as sock:
            sock.sendall(request)
            reply = sock.recv(64)
    assert reply[7] == 0x03, reply.hex()
    assert reply[9:13] == b"SunS", reply.hex()
