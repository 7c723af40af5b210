"""Docs are part of the feature: every hook is documented with the spec's signature and has
a test, and every hook example is a file under docs/examples/hooks/ that the docs show
verbatim and that runs and registers cleanly, its descriptors merged into a registry."""

from __future__ import annotations

import inspect
import re
import types
from functools import cached_property
from pathlib import Path

import pytest

from der_sdk import hookspecs, load_plugins
from der_sdk.plugins import Plugins

ROOT = Path(__file__).resolve().parent.parent
HOOK_DOC = ROOT / "docs" / "plugin_hooks.md"
GUIDE = ROOT / "docs" / "plugin_guide.md"
EXAMPLES = ROOT / "docs" / "examples" / "hooks"
HOOKS = sorted(n for n in dir(hookspecs) if n.startswith("der_"))
REGISTRIES = sorted(n for n, v in vars(Plugins).items() if isinstance(v, cached_property))


def _sections() -> dict[str, str]:
    text = HOOK_DOC.read_text()
    parts = re.split(r"^## (\w+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_hook_has_a_docs_section() -> None:
    assert sorted(_sections()) == HOOKS


def _spec_signature(hook: str) -> tuple[list[str], str]:
    """The argument names of the spec of ``hook`` and its signature as the docs show it."""
    signature = inspect.signature(getattr(hookspecs, hook))
    names = list(signature.parameters)
    arguments = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return names, f"{hook}({arguments}) -> {signature.return_annotation}"


@pytest.mark.parametrize("hook", HOOKS)
def test_the_documented_signature_is_the_hookspec(hook: str) -> None:
    blocks = re.findall(r"^```\n(.*?)\n```", _sections()[hook], flags=re.S | re.M)
    assert blocks, f"the {hook} section of {HOOK_DOC.name} shows its signature in a ``` block"
    documented = blocks[0].strip()
    match = re.fullmatch(rf"{hook}\((.*)\) -> .+", documented, flags=re.S)
    assert match, f"the {hook} section shows {documented!r}, not a signature of {hook}"
    names, signature = _spec_signature(hook)
    documented_names = re.findall(r"(\w+)\s*:", match.group(1))
    assert documented_names == names, (
        f"{HOOK_DOC.name} documents {hook} with arguments {documented_names}; "
        f"der_sdk/hookspecs.py declares {names}"
    )
    assert documented == signature, (
        f"{HOOK_DOC.name} shows {documented!r}; the spec is {signature!r}"
    )


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_exercised_by_a_test(hook: str) -> None:
    sources = [
        p.read_text() for p in (ROOT / "tests").rglob("test_*.py") if p.name != "test_docs.py"
    ]
    assert any(hook in s for s in sources), f"{hook} has no test"


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_docs_example_runs_and_registers(hook: str) -> None:
    section = _sections()[hook]
    assert f"{hook}(" in section, "the section shows the signature"
    example = EXAMPLES / f"{hook}.py"
    assert example.is_file(), f"{hook}: put its example in {example.relative_to(ROOT)}"
    code = example.read_text()
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks == [code], (
        f"the {hook} section of {HOOK_DOC.name} must show {example.relative_to(ROOT)} "
        "verbatim in one ```python block (copy the file into the docs)"
    )
    assert f"(examples/hooks/{hook}.py)" in section, f"the {hook} section links its example"
    module = types.ModuleType(f"doc_example_{hook}")
    exec(compile(code, str(example), "exec"), module.__dict__)
    plugins = load_plugins(entry_points=False, extra=[(module.__name__, module)], env={})
    row = next(i for i in plugins.info() if i.name == module.__name__)
    assert hook in row.hooks
    registries = [getattr(plugins, name) for name in REGISTRIES]  # merge: no clash
    if hook in hookspecs.OBSERVER_HOOKS:
        return
    for descriptor in getattr(module, hook)():
        assert any(descriptor.name in registry for registry in registries), (
            f"{descriptor.name!r} from the {hook} example is in none of the registries"
        )


def test_every_example_file_belongs_to_a_hook() -> None:
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == HOOKS


def test_the_plugin_guide_points_at_every_hook_section() -> None:
    guide = GUIDE.read_text()
    missing = [h for h in HOOKS if f"plugin_hooks.md#{h}" not in guide]
    assert not missing, f"docs/plugin_guide.md does not link the sections of {missing}"


def test_the_readme_demo_section_names_sites_and_assets_of_the_default_example() -> None:
    """The README's demo commands work against what ``der demo`` runs: every id they use
    is a site or asset of the default example's inventory."""
    from der_sdk.inventory import load_inventory
    from der_sdk_headend.demo import DEFAULT_EXAMPLE, EXAMPLES, example_file

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The demo, step by step", 1)[1].split("\n## ", 1)[0]
    ids = set(re.findall(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}\b", section))
    inventory = load_inventory(example_file(EXAMPLES[DEFAULT_EXAMPLE].assets))
    assert ids, "the demo section shows commands with ids"
    assert ids <= set(inventory.sites) | set(inventory.assets), ids - set(inventory.assets)
    assert f"examples/{EXAMPLES[DEFAULT_EXAMPLE].assets}" in section, "it links the inventory"
