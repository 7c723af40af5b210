"""``der new-adapter`` and the cookiecutter template: names, generated files, and the
generated plugins installed into a throwaway environment where their own tests pass and
``der`` lists them."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import pytest

import der_sdk
from der_sdk.cli import main
from der_sdk.scaffold import (
    NAME_RULE,
    ScaffoldError,
    distribution_name,
    find_template,
    new_adapter,
    package_name,
    validate_name,
)

ROOT = Path(__file__).resolve().parent.parent
PURELIB = sysconfig.get_paths()["purelib"]
PIP_QUIET = ("--no-deps", "--quiet", "--disable-pip-version-check", "--no-input")

ADAPTER_FILES = {
    "pyproject.toml",
    "README.md",
    "ci.sh",
    "der_sdk_acme_inverter/__init__.py",
    "der_sdk_acme_inverter/adapter.py",
    "der_sdk_acme_inverter/py.typed",
    "tests/test_plugin_listed.py",
    "tests/test_conformance.py",
}
PACK_FILES = {
    "pyproject.toml",
    "README.md",
    "ci.sh",
    "der_sdk_acme_meter/__init__.py",
    "der_sdk_acme_meter/py.typed",
    "der_sdk_acme_meter/profiles/acme-meter.yaml",
    "tests/test_plugin_listed.py",
}


def files_under(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def run(cmd: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run ``cmd``; on failure show its output (the generated project's test report)."""
    (out,) = run_together([(cmd, cwd)], timeout=timeout)
    return out


def run_together(
    commands: Sequence[tuple[Sequence[str | Path], Path | None]],
    *,
    timeout: float = 120,
    only_plugins: str | None = None,
) -> list[str]:
    """Run independent ``(cmd, cwd)`` pairs at the same time; their outputs, in order.

    :param only_plugins: ``DER_SDK_PLUGINS`` for the commands: load only these plugins, so
        other plugins installed here (broken or not) do not affect the result.
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if only_plugins is not None:
        env["DER_SDK_PLUGINS"] = only_plugins
    started = [
        (
            cmd,
            subprocess.Popen(
                [str(c) for c in cmd],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
        for cmd, cwd in commands
    ]
    outputs: list[str] = []
    for cmd, process in started:
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        assert process.returncode == 0, (
            f"{' '.join(map(str, cmd))} exited {process.returncode}\n{out}\n{err}"
        )
        outputs.append(out)
    return outputs


def make_venv(folder: Path, *, parent_site: str, process_pth: bool) -> Path:
    """A virtual environment without pip whose ``sys.path`` ends with ``parent_site``.

    ``process_pth``: add it as a site directory (its ``.pth`` files run, so editable installs
    there, der-sdk's among them, are importable) instead of as a plain path entry.
    """
    run([sys.executable, "-m", "venv", "--without-pip", folder])
    python = folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    line = f"import site; site.addsitedir({parent_site!r})" if process_pth else parent_site
    (Path(site.strip()) / "der_sdk_test_parent.pth").write_text(line + "\n")
    return python


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "bad",
    ["Acme", "1acme", "acme_inverter", "acme--inverter", "acme-", "-acme", "acme inverter", ""],
)
def test_names_that_break_the_rule_are_refused_naming_the_rule(bad: str) -> None:
    with pytest.raises(ScaffoldError, match="use lowercase letters, digits and single hyphens"):
        validate_name(bad)


def test_the_der_sdk_prefix_is_refused_with_the_name_to_use() -> None:
    with pytest.raises(ScaffoldError, match=r"leave out the der-sdk- prefix.*'acme'"):
        validate_name("der-sdk-acme")


@pytest.mark.parametrize("good", ["acme", "acme-inverter", "x2", "b-2000-v2"])
def test_valid_names_give_distribution_and_package(good: str) -> None:
    assert validate_name(good) == good
    assert distribution_name(good) == f"der-sdk-{good}"
    assert package_name(good) == "der_sdk_" + good.replace("-", "_")


def test_cli_exits_2_naming_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["new-adapter", "Acme_Inverter", "--no-input", "--output", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("der new-adapter: error: invalid plugin name 'Acme_Inverter'")
    assert NAME_RULE in err
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_an_existing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "der-sdk-acme").mkdir()
    assert main(["new-adapter", "acme", "--no-input", "--output", str(tmp_path)]) == 2
    assert "der-sdk-acme already exists" in capsys.readouterr().err


@pytest.mark.parametrize("vendor", ['Acme "Power"', "Acme\\Power", "Acme\nPower", " "])
def test_text_that_would_break_the_generated_files_is_refused(vendor: str, tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError, match="--vendor"):
        new_adapter("acme", output=tmp_path, vendor=vendor)
    assert list(tmp_path.iterdir()) == []


def test_the_template_itself_refuses_a_bad_name(tmp_path: Path) -> None:
    """For people who run cookiecutter on templates/der-adapter directly."""
    from der_sdk.scaffold import _generate

    with pytest.raises(ScaffoldError, match="the template refused the input"):
        _generate(find_template(), tmp_path, {"name": "Bad Name"})


# --------------------------------------------------------------------------- generation


def test_generates_an_adapter_plugin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["acme-inverter", "--vendor", "Acme", "--no-input", "--output", str(tmp_path)]
    code = main(["new-adapter", *args])
    assert code == 0
    project = tmp_path / "der-sdk-acme-inverter"
    assert f"created {project}" in capsys.readouterr().out
    assert files_under(project) == ADAPTER_FILES
    pyproject = (project / "pyproject.toml").read_text()
    for expected in (
        'name = "der-sdk-acme-inverter"',
        '"der-sdk>=0.1"',
        '"Framework :: der-sdk"',
        '[project.entry-points.der_sdk]\nacme-inverter = "der_sdk_acme_inverter"',
        'asyncio_mode = "auto"',
        'testpaths = ["tests"]',
    ):
        assert expected in pyproject
    init = (project / "der_sdk_acme_inverter" / "__init__.py").read_text()
    assert "from der_sdk import hookimpl" in init
    assert 'name="acme-inverter"' in init
    adapter = (project / "der_sdk_acme_inverter" / "adapter.py").read_text()
    assert "class AcmeInverterOptions(msgspec.Struct" in adapter
    assert "class AcmeInverterAdapter(Adapter)" in adapter
    conformance = (project / "tests" / "test_conformance.py").read_text()
    assert "class TestAcmeInverterConformance(AdapterConformance)" in conformance
    assert os.access(project / "ci.sh", os.X_OK)
    assert "pip install --quiet -e" in (project / "ci.sh").read_text()
    if shutil.which("bash"):
        run(["bash", "-n", project / "ci.sh"])  # at least it parses


def test_generates_a_device_pack(tmp_path: Path) -> None:
    project = new_adapter("acme-meter", output=tmp_path, device_pack=True, vendor="Acme")
    assert files_under(project) == PACK_FILES
    assert '"profiles/*.yaml"' in (project / "pyproject.toml").read_text()
    init = (project / "der_sdk_acme_meter" / "__init__.py").read_text()
    assert "return load_profiles(__name__)" in init


def test_asks_for_what_is_not_given_unless_no_input(tmp_path: Path) -> None:
    asked: list[tuple[str, str]] = []

    def answer(question: str, default: str) -> str:
        asked.append((question, default))
        return {"Author": "Ada"}.get(question, default)

    project = new_adapter(
        "acme-pv", output=tmp_path, vendor="Acme Solar", no_input=False, prompt=answer
    )
    assert asked == [
        ("One-line description", "Acme Solar device adapter for der-sdk"),
        ("Author", "der-sdk plugin author"),
    ]
    assert 'authors = [{ name = "Ada" }]' in (project / "pyproject.toml").read_text()


def test_generated_code_passes_ruff(tmp_path: Path) -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra)")
    projects = [
        new_adapter("acme-inverter", output=tmp_path),
        new_adapter("zz9-plural-z-alpha", output=tmp_path, vendor="Zeta Energy Systems"),
        new_adapter("acme-meter", output=tmp_path, device_pack=True),
    ]
    for project in projects:  # in its own folder: its pyproject.toml configures ruff
        run([ruff, "check", "--no-cache", "."], cwd=project)
        run([ruff, "format", "--check", "--no-cache", "."], cwd=project)


# --------------------------------------------------------------------------- finding it


def test_template_is_found_through_the_package_link_in_a_checkout() -> None:
    found = find_template()
    assert found == Path(der_sdk.__file__).resolve().parent / ".templates" / "der-adapter"
    assert found.resolve() == ROOT / "templates" / "der-adapter"


def test_template_falls_back_to_the_repository_folder(tmp_path: Path) -> None:
    package_dir = tmp_path / "der_sdk"
    package_dir.mkdir()
    (tmp_path / "templates" / "der-adapter").mkdir(parents=True)
    (tmp_path / "templates" / "der-adapter" / "cookiecutter.json").write_text("{}")
    assert find_template(package_dir=package_dir) == tmp_path / "templates" / "der-adapter"
    with pytest.raises(ScaffoldError, match="template 'other' not found"):
        find_template("other", package_dir=package_dir)


# --------------------------------------------------------------------------- acceptance


def test_generated_plugins_install_pass_their_tests_and_are_listed(tmp_path: Path) -> None:
    """The acceptance test: generate, pip install -e into an isolated environment, run the
    generated tests there, and find the plugins with ``der plugins`` and ``der profiles``."""
    inverter = new_adapter("acme-inverter", output=tmp_path / "gen", vendor="Acme")
    meter = new_adapter("acme-meter", output=tmp_path / "gen", vendor="Acme", device_pack=True)
    # der-sdk, pytest and friends come from this environment (its .pth files run, so
    # editable installs resolve); the generated plugins go into the new one only.
    python = make_venv(tmp_path / "venv", parent_site=PURELIB, process_pth=True)
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            *PIP_QUIET,
            "--no-build-isolation",
            "-e",
            inverter,
            "-e",
            meter,
        ],
        timeout=300,
    )

    pytest_args = ["-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"]
    *reports, plugins_json, profiles_json = run_together(
        [
            ([python, *pytest_args, inverter], inverter),
            ([python, *pytest_args, meter], meter),
            ([python, "-m", "der_sdk.cli", "plugins", "--json"], None),
            ([python, "-m", "der_sdk.cli", "profiles", "--json"], None),
        ],
        only_plugins="acme-inverter,acme-meter",
    )
    for report in reports:
        assert " passed" in report and "skipped" not in report, report

    rows = {r["package"]: r for r in json.loads(plugins_json)}
    assert rows["der-sdk-acme-inverter"]["provides"] == {"adapter_types": ["acme-inverter"]}
    assert rows["der-sdk-acme-meter"]["provides"] == {"device_profiles": ["acme-meter@1.0.0"]}
    assert {
        "name": "acme-meter",
        "version": "1.0.0",
        "vendor": "Acme",
        "model": "MODEL-1",
        "protocol": "modbus",
        "points": 3,
        "package": "der-sdk-acme-meter",
    } in json.loads(profiles_json)
    for distribution in ("der-sdk-acme-inverter", "der-sdk-acme-meter"):  # stayed isolated
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.distribution(distribution)
