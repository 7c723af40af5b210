from der_sdk import hookimpl

received = []


@hookimpl
def der_telemetry_received(samples):
    received.extend(s.asset_id for s in samples)
