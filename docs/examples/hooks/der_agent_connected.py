from der_sdk import hookimpl

online = set()


@hookimpl
def der_agent_connected(sessions, assets):
    online.update(a.asset_id for a in assets)
