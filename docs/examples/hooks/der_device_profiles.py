from der_sdk import hookimpl
from der_sdk.extensions import DevicePoint, DeviceProfile


@hookimpl
def der_device_profiles():
    return [
        DeviceProfile(
            name="acme-b2",
            vendor="Acme",
            model="B2",
            version="1.0.0",
            protocol="modbus",
            points={"active_power": DevicePoint(address=40001, unit="kW", scale=0.001, field="mw")},
        )
    ]
