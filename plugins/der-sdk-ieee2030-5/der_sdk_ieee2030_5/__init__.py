"""der-sdk-ieee2030-5: an IEEE 2030.5 / CSIP aggregator client for der-sdk, as the
``ieee2030.5`` program source (``docs/programs.md``, "IEEE 2030.5")."""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from der_sdk import hookimpl
from der_sdk.lazy_exports import lazy_getattr
from der_sdk.programs import ProgramContext, ProgramSource, ProgramSourceType
from der_sdk_ieee2030_5.options import EndDeviceOptions, Ieee20305Options

if TYPE_CHECKING:
    from der_sdk_ieee2030_5.source import Ieee20305Source

__all__ = ["SOURCE_NAME", "EndDeviceOptions", "Ieee20305Options", "Ieee20305Source"]

SOURCE_NAME = "ieee2030.5"

# Imported on first use: every ``der`` process loads this plugin, and the IEEE 2030.5
# schema (envoy-schema, pydantic-xml) costs it most of a second that only a headend with
# an ``ieee2030.5`` program needs.
__getattr__ = lazy_getattr(__name__, {"Ieee20305Source": "source"})


def _source(context: ProgramContext, options: Any) -> ProgramSource:
    from der_sdk_ieee2030_5.source import Ieee20305Source

    return Ieee20305Source(context, options)


@hookimpl
def der_program_sources() -> list[ProgramSourceType]:
    return [
        ProgramSourceType(
            name=SOURCE_NAME,
            factory=_source,
            options=Ieee20305Options,
            description="IEEE 2030.5 / CSIP aggregator client: DERControls as scheduled"
            " dispatches, with responses and mirrored real power",
        )
    ]
