import logging

from der_sdk import hookimpl

pager = logging.getLogger("pager")


@hookimpl
def der_alarm_changed(alarm, change):
    if alarm.severity == "critical" and change in ("raised", "reraised"):
        pager.warning("PAGE: %s on asset %s: %s", alarm.code, alarm.asset_id, alarm.text)
