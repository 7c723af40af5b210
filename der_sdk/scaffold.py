"""``der new-adapter``: generate a plugin distribution from the cookiecutter template.

The template is ``templates/der-adapter/`` at the root of the repository. It generates
either an adapter plugin (flavour ``adapter``: the ``der_adapter_types`` hook, an in-memory
example adapter, its options schema, a conformance test) or a device pack (flavour
``device-pack``: the ``der_device_profiles`` hook and a profile YAML file). Both come with
``pyproject.toml``, tests, a README and ``ci.sh``.

Where the template is found (:func:`find_template`):

1. ``der_sdk/.templates/der-adapter``: package data. In a source checkout (and so in an
   editable install) ``der_sdk/.templates`` is a symbolic link to ``../templates``; a wheel
   built from the checkout holds a copy of the files there, so a non-editable
   ``pip install .`` has them too. (The leading dot keeps ``mypy der_sdk`` and package
   discovery out of the template, whose folders are not Python packages until generated.)
2. ``<repository>/templates/der-adapter`` next to the ``der_sdk`` package, for a checkout
   where the link was not created (git on Windows without symlink support).
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packaging.version import Version

from der_sdk import __version__
from der_sdk.errors import DerSdkError

__all__ = [
    "NAME_RULE",
    "TEMPLATE",
    "ScaffoldError",
    "distribution_name",
    "find_template",
    "new_adapter",
    "package_name",
    "validate_name",
]

TEMPLATE = "der-adapter"
NAME_RULE = (
    "lowercase letters, digits and single hyphens, starting with a letter and not ending "
    "with a hyphen (e.g. acme-inverter), without the der-sdk- prefix (it is added)"
)
_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")

Prompt = Callable[[str, str], str]
"""``prompt(question, default) -> answer``; the default when the answer is empty."""


class ScaffoldError(DerSdkError):
    """``der new-adapter`` could not generate the plugin; the message says why."""


def validate_name(name: str) -> str:
    """``name`` when it can name a plugin, else :class:`ScaffoldError` stating the rule."""
    if name.startswith(("der-sdk-", "der_sdk_")):
        raise ScaffoldError(
            f"invalid plugin name {name!r}: leave out the der-sdk- prefix; it is added "
            f"for you (try {name[len('der-sdk-') :]!r})"
        )
    if not _NAME.fullmatch(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: use {NAME_RULE}")
    return name


def distribution_name(name: str) -> str:
    """``acme-inverter`` → ``der-sdk-acme-inverter`` (what ``pip install`` takes)."""
    return f"der-sdk-{name}"


def package_name(name: str) -> str:
    """``acme-inverter`` → ``der_sdk_acme_inverter`` (what ``import`` takes)."""
    return f"der_sdk_{name.replace('-', '_')}"


def find_template(name: str = TEMPLATE, *, package_dir: Path | None = None) -> Path:
    """The folder of template ``name``: package data first, then the repository.

    :param package_dir: the ``der_sdk`` package folder (default: this one).
    :raises ScaffoldError: neither exists (a broken installation); the message lists
        where it looked.
    """
    package_dir = package_dir or Path(__file__).resolve().parent
    candidates = [package_dir / ".templates" / name, package_dir.parent / "templates" / name]
    for candidate in candidates:
        if (candidate / "cookiecutter.json").is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ScaffoldError(f"template {name!r} not found (looked in {looked}); reinstall der-sdk")


def _check_text(what: str, value: str | None) -> str:
    """``value`` if it can go inside the quotes of generated TOML and Python strings."""
    text = (value or "").strip()
    if not text:
        raise ScaffoldError(f"--{what} must not be empty")
    bad = sorted({c for c in text if c in '"\\' or not c.isprintable()})
    if bad:
        raise ScaffoldError(
            f"--{what} {text!r} contains {', '.join(map(repr, bad))}; the generated files "
            "quote it, so leave out double quotes, backslashes and control characters"
        )
    return text


def _default_vendor(name: str) -> str:
    return name.split("-", 1)[0].capitalize()


def _ask_on_terminal(question: str, default: str) -> str:
    answer = input(f"{question} [{default}]: ").strip()
    return answer or default


def new_adapter(
    name: str,
    *,
    output: str | Path = ".",
    vendor: str | None = None,
    description: str | None = None,
    author: str | None = None,
    device_pack: bool = False,
    no_input: bool = True,
    prompt: Prompt | None = None,
) -> Path:
    """Generate ``der-sdk-<name>`` in ``output`` and return its folder.

    :param name: the plugin name: entry point name, adapter type (or profile) name, and
        the suffix of the distribution and package names.
    :param device_pack: generate a device pack instead of an adapter plugin.
    :param no_input: take defaults for what is not given instead of asking.
    :param prompt: how to ask (default: on the terminal, when standard input is one).
    :raises ScaffoldError: the name breaks the rule, the folder exists, or the template
        failed; the message says which.
    """
    validate_name(name)
    target = Path(output) / distribution_name(name)
    if target.exists():
        raise ScaffoldError(f"{target} already exists; remove it or choose another --output folder")
    flavour = "device-pack" if device_pack else "adapter"
    kind = "device profiles" if device_pack else "device adapter"
    context: dict[str, Any] = {"name": name, "flavour": flavour}
    answers = {
        "vendor": ("Device vendor", vendor, _default_vendor(name)),
        "description": ("One-line description", description, None),
        "author": ("Author", author, "der-sdk plugin author"),
    }
    ask = prompt if prompt is not None else (_ask_on_terminal if sys.stdin.isatty() else None)
    for key, (question, given, default) in answers.items():
        if given is None and default is None:  # description: from the vendor chosen above
            default = f"{context['vendor']} {kind} for der-sdk"
        value = given if given is not None else default
        if given is None and not no_input and ask is not None:
            value = ask(question, default or "")
        context[key] = _check_text(key, value)
    release = Version(__version__)
    context["__der_sdk_version"] = f"{release.major}.{release.minor}"
    return _generate(find_template(), Path(output), context)


def _generate(template: Path, output: Path, context: dict[str, Any]) -> Path:
    from cookiecutter.exceptions import (  # type: ignore[import-untyped]
        CookiecutterException,
        FailedHookException,
    )
    from cookiecutter.main import cookiecutter  # type: ignore[import-untyped]

    output.mkdir(parents=True, exist_ok=True)
    # default_config (a dict): ignore the user's ~/.cookiecutterrc, and keep the replay
    # file cookiecutter always writes out of the user's home.
    with tempfile.TemporaryDirectory(prefix="der-new-adapter-") as replay_dir:
        try:
            project = cookiecutter(
                str(template),
                no_input=True,
                extra_context=context,
                output_dir=str(output),
                default_config={"replay_dir": replay_dir},
            )
        except FailedHookException as exc:
            raise ScaffoldError(f"the template refused the input: {exc}") from None
        except CookiecutterException as exc:
            raise ScaffoldError(
                f"generating from {template} failed: {type(exc).__name__}: {exc}"
            ) from None
    return Path(project)
