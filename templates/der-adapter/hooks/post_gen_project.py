"""Keep only the files of the chosen flavour (``adapter`` or ``device-pack``)."""

import shutil
from pathlib import Path

FLAVOUR = "{{ cookiecutter.flavour }}"
PACKAGE = Path("{{ cookiecutter.__package }}")

if FLAVOUR == "device-pack":
    for path in (PACKAGE / "adapter.py", Path("tests/test_conformance.py")):
        path.unlink()
else:
    shutil.rmtree(PACKAGE / "profiles")
