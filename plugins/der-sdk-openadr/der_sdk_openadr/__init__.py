"""der-sdk-openadr: an OpenADR 2.0b VEN (openleadr) as a der-sdk program source.

Configure it as a program of the headend's inventory with ``source: openadr2b``
(docs/programs.md, "OpenADR 2.0b"): events from the VTN become site dispatches by the
configured rule, opted in or out by the operator's policy, with the sites' MW reported
back to the VTN.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from der_sdk import hookimpl
from der_sdk.programs import ProgramContext, ProgramSourceType
from der_sdk_openadr.mapping import OpenAdrOptions

__all__ = ["OpenAdrOptions", "der_program_sources"]


def _build(ctx: ProgramContext, options: Any) -> Any:
    from der_sdk_openadr.ven import OpenAdrVen  # openleadr loads only when used

    return OpenAdrVen(ctx, options)


@hookimpl
def der_program_sources() -> list[ProgramSourceType]:
    return [
        ProgramSourceType(
            name="openadr2b",
            factory=_build,
            options=OpenAdrOptions,
            description="OpenADR 2.0b VEN (openleadr): events to site dispatches, opt "
            "responses and telemetry reports to the VTN",
        )
    ]
