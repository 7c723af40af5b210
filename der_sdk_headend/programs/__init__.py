"""Northbound programs (docs/programs.md): the sources configured under ``programs:`` in
the inventory, run by :class:`ProgramRunner`; :mod:`.context` is the headend's side of
each one, :mod:`.precedence` the rule between operators and programs (pure functions).
"""

from der_sdk_headend.programs.context import HeadendProgramContext
from der_sdk_headend.programs.precedence import MANUAL_SOURCES, manual_hold, to_request
from der_sdk_headend.programs.runner import ProgramHealth, ProgramRunner

__all__ = [
    "MANUAL_SOURCES",
    "HeadendProgramContext",
    "ProgramHealth",
    "ProgramRunner",
    "manual_hold",
    "to_request",
]
