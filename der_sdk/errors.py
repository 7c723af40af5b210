"""Errors a user can meet. Each says what was wrong, where, and what to do."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError", "ConfigIssue", "DerSdkError", "PluginError", "UnknownNameError"]


class DerSdkError(Exception):
    """Base of every error the SDK raises on purpose. The CLI prints these without a traceback."""


class PluginError(DerSdkError):
    """A plugin could not be loaded or registered; the message names the plugin."""


class UnknownNameError(DerSdkError, KeyError):
    """A configured name (adapter, asset type, policy, storage scheme) is not installed."""

    def __init__(self, kind: str, name: str, installed: Iterable[str]) -> None:
        self.kind = kind
        self.name = name
        self.installed = sorted(installed)
        listed = ", ".join(self.installed) or "none"
        super().__init__(f"unknown {kind} {name!r}; installed: {listed}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigIssue:
    """One problem in a configuration file: file, line, field and message."""

    __slots__ = ("field", "line", "message", "path")

    def __init__(self, path: str, line: int | None, field: str | None, message: str) -> None:
        self.path = path
        self.line = line
        self.field = field
        self.message = message

    def __str__(self) -> str:
        where = self.path if self.line is None else f"{self.path}:{self.line}"
        what = f" {self.field}:" if self.field else ""
        return f"{where}:{what} {self.message}"

    def __repr__(self) -> str:
        return f"ConfigIssue({self!s})"


class ConfigError(DerSdkError):
    """A configuration file was rejected. ``issues`` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))
