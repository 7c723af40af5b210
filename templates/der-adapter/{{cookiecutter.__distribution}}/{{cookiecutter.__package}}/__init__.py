{%- if cookiecutter.flavour == "adapter" -%}
{% set exported = ["SimulatedDevice", cookiecutter.__class ~ "Adapter", cookiecutter.__class ~ "Options"] -%}
"""{{ cookiecutter.__distribution }}: {{ cookiecutter.description }}.

Registered through the ``der_sdk`` entry point group; choose it per asset in the agent
config with ``adapter: {{ cookiecutter.name }}``; its options are
:class:`{{ cookiecutter.__class }}Options`.
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.extensions import AdapterType

from {{ cookiecutter.__package }}.adapter import (
{%- for item in exported | sort(case_sensitive=True) %}
    {{ item }},
{%- endfor %}
)

__all__ = [
{%- for item in exported | sort(case_sensitive=True) %}
    "{{ item }}",
{%- endfor %}
    "der_adapter_types",
]
__version__ = "0.1.0"


@hookimpl
def der_adapter_types() -> list[AdapterType]:
    """The ``{{ cookiecutter.name }}`` adapter type (see der-sdk's docs/plugin_hooks.md)."""
    return [
        AdapterType(
            name="{{ cookiecutter.name }}",
            factory={{ cookiecutter.__class }}Adapter,
            options={{ cookiecutter.__class }}Options,
            description="{{ cookiecutter.description }}",
        )
    ]
{%- else -%}
"""{{ cookiecutter.__distribution }}: {{ cookiecutter.description }}.

Each YAML file in ``profiles/`` is one device profile; der-sdk validates them when the
plugins load (see der-sdk's docs/device_packs.md for the format).
"""

from __future__ import annotations

from der_sdk import hookimpl
from der_sdk.device_packs import load_profiles
from der_sdk.extensions import DeviceProfile

__all__ = ["der_device_profiles"]
__version__ = "0.1.0"


@hookimpl
def der_device_profiles() -> list[DeviceProfile]:
    """The profiles in ``profiles/*.yaml`` (see der-sdk's docs/plugin_hooks.md)."""
    return load_profiles(__name__)
{%- endif %}
