"""der-sdk-ieee2030-5: an IEEE 2030.5 / CSIP aggregator client for der-sdk, as the
``ieee2030.5`` program source (``docs/programs.md``, "IEEE 2030.5")."""

from __future__ import annotations

__version__ = "0.1.0"

from der_sdk import hookimpl
from der_sdk.programs import ProgramSourceType
from der_sdk_ieee2030_5.options import EndDeviceOptions, Ieee20305Options
from der_sdk_ieee2030_5.source import Ieee20305Source

__all__ = ["SOURCE_NAME", "EndDeviceOptions", "Ieee20305Options", "Ieee20305Source"]

SOURCE_NAME = "ieee2030.5"


@hookimpl
def der_program_sources() -> list[ProgramSourceType]:
    return [
        ProgramSourceType(
            name=SOURCE_NAME,
            factory=Ieee20305Source,
            options=Ieee20305Options,
            description="IEEE 2030.5 / CSIP aggregator client: DERControls as scheduled"
            " dispatches, with responses and mirrored real power",
        )
    ]
