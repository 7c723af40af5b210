import logging

from der_sdk import hookimpl


@hookimpl
def der_dispatch_validated(dispatch):
    if abs(dispatch.mw) > 50:
        logging.getLogger("guardrail").warning("large dispatch %s", dispatch.dispatch_id)
