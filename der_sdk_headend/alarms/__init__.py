"""Alarms: device conditions and lost agent links that operators acknowledge
(docs/alarms.md).

:mod:`.state` holds the pure rules (raise, clear, de-bounce), :mod:`.book` applies agent
events and acknowledgements through storage and tells plugins, :mod:`.comms` raises
``comms_loss`` for the assets of an agent whose stream stays away.
"""

from der_sdk_headend.alarms.book import AlarmBook
from der_sdk_headend.alarms.comms import CommsLossWatch
from der_sdk_headend.alarms.state import (
    COMMS_LOSS,
    CONDITION_CLEARED,
    CONDITION_RAISED,
    AlarmChangeKind,
    Condition,
)

__all__ = [
    "COMMS_LOSS",
    "CONDITION_CLEARED",
    "CONDITION_RAISED",
    "AlarmBook",
    "AlarmChangeKind",
    "CommsLossWatch",
    "Condition",
]
