"""der-sdk: build adapters for distributed energy resources as pip-installable plugins.

``from der_sdk import hookimpl`` to implement a hook; see :mod:`der_sdk.hookspecs`.
"""

from der_sdk.plugins import hookimpl, load_plugins

__all__ = ["__version__", "hookimpl", "load_plugins"]
__version__ = "0.1.0"
