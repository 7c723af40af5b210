from der_sdk import hookimpl

offline = []


@hookimpl
def der_agent_disconnected(sessions):
    offline.extend(s.asset_id for s in sessions)
