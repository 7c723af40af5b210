from der_sdk import hookimpl
from der_sdk.extensions import StorageBackendType
from der_sdk.storage.memory import MemoryStorage


@hookimpl
def der_storage_backends():
    # a second name for the in-memory backend, as an example of the shape
    return [
        StorageBackendType(name="scratch", schemes=("scratch",), factory=MemoryStorage.from_url)
    ]
