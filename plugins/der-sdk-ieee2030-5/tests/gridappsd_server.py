"""PNNL's GridAPPS-D IEEE 2030.5 server (PyPI ``gridappsd-2030-5``), an independent
server, installed in a virtual environment of its own and run as a subprocess.

0.0.2a37 pins gevent 21, which has no wheel for Python 3.11 and does not build there; on
Python 3.10 it installs from wheels and runs. The venv is made once and cached in
``~/.cache/der-sdk-tests`` (``DER_SDK_TEST_CACHE`` overrides). Without a Python 3.10 the
tests skip, or fail under ``DER_SDK_REQUIRE_SERVICES=1``.

What this version serves (found by running it, docs/programs.md): DeviceCapability,
EndDeviceList (EndDevices created at start from its config, one client certificate each),
FunctionSetAssignmentsList, the DERProgramList linked from the DeviceCapability, DERControl
lists, MirrorUsagePoints; an admin API that takes DERControls (``POST
/admin/derp/<n>/derc``). It has no Response resource (the route is commented out in its
source), a GET of one EndDevice, of a FunctionSetAssignments or of ``/tm`` answers 500.
"""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from der_sdk.testing.services import services_required

PACKAGE = "gridappsd-2030-5==0.0.2a37"

OPENSSL_CNF = """\
# The CA configuration the server's certificate store runs ``openssl ca`` with; it puts
# subjectAltName IP:127.0.0.1 in every certificate it signs (the server's own included),
# so that a client verifying the hostname can talk to it on loopback.
[ ca ]
default_ca = CA_default

[ CA_default ]
dir = REPLACE_WITH_REPO_PATH
database = $dir/index.txt
new_certs_dir = $dir/certs
serial = $dir/serial
default_md = sha256
default_days = 365
policy = policy_any
x509_extensions = leaf_ext
copy_extensions = none

[ policy_any ]
countryName = optional
commonName = supplied

[ req ]
distinguished_name = req_dn
prompt = no

[ req_dn ]
CN = unused

[ v3_ca ]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ leaf_ext ]
basicConstraints = CA:false
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""

CONFIG = """\
server: 127.0.0.1
port: {port}
tls_repository: "{root}/tls"
openssl_cnf: "{root}/openssl.cnf"
server_mode: enddevices_create_on_start
lfdi_mode: lfdi_mode_from_cert_fingerprint
generate_admin_cert: true
storage_path: "{root}/data_store"
cleanse_storage: true
include_default_der_on_all_devices: true
default_program:
  description: Utility program
  primacy: 1
  DefaultDERControl:
    DERControlBase:
      opModConnect: true
      opModEnergize: true
devices:
  - id: site1
    pin: 111115
    fsas: [FSA 1]
fsas:
  - description: FSA 1
    programs: [Utility program]
programs:
  - description: Utility program
    primacy: 1
    DefaultDERControl:
      DERControlBase:
        opModConnect: true
        opModEnergize: true
"""


def _skip_or_fail(reason: str) -> None:
    if services_required():
        pytest.fail(f"{reason}; DER_SDK_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(f"{reason}; set DER_SDK_REQUIRE_SERVICES=1 to make this a failure")


def find_python310() -> str | None:
    """A Python 3.10 interpreter that runs: under pyenv, or on PATH (a pyenv shim on PATH
    may name a version it will not run, so each candidate is tried)."""
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates = sorted(glob.glob(f"{root}/versions/3.10.*/bin/python3.10"), reverse=True)
    on_path = shutil.which("python3.10")
    for candidate in [*candidates, *([on_path] if on_path else [])]:
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2] == (3, 10))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def server_venv() -> Path:
    """The cached venv with the server installed (made on first use: minutes)."""
    cache = Path(os.environ.get("DER_SDK_TEST_CACHE", Path.home() / ".cache" / "der-sdk-tests"))
    venv = cache / "gridappsd-2030-5-0.0.2a37-py310"
    complete = venv / "installed"
    if complete.exists():
        return venv
    cache.mkdir(parents=True, exist_ok=True)
    # Two suites at once on one machine (pytest-xdist workers, or two checkouts) would
    # each remove and rebuild the other's half-made venv: one builds, the rest wait.
    with (cache / f"{venv.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            _build_venv(venv, complete)
    return venv


def _build_venv(venv: Path, complete: Path) -> None:
    python = find_python310()
    if python is None:
        _skip_or_fail(f"{PACKAGE} needs Python 3.10 (its gevent 21 does not build on 3.11)")
    assert python is not None
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
    steps = [
        [python, "-m", "venv", str(venv)],
        [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", PACKAGE],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=1200, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            _skip_or_fail(f"cannot install {PACKAGE}: {' | '.join(tail)}")
    complete.write_text(PACKAGE + "\n")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GridappsdServer:
    """One running server: its URL, the CA, and the client and admin certificates."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}/dcap"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    def tls(self, name: str) -> tuple[str, str]:
        """(certificate, key) of ``name`` (``site1``, ``admin``)."""
        return str(self.root / f"tls/certs/{name}.crt"), str(self.root / f"tls/private/{name}.pem")

    @property
    def ca(self) -> str:
        return str(self.root / "tls/certs/ca.crt")

    def start(self, venv: Path, timeout_s: float = 90.0) -> None:
        (self.root / "openssl.cnf").write_text(OPENSSL_CNF)
        (self.root / "config.yml").write_text(CONFIG.format(port=self.port, root=self.root))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [str(venv / "bin" / "2030_5_server"), "config.yml", "--create-certs"],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited: {self.log.read_text()[-2000:]}")
            if Path(self.ca).exists() and self._answers():
                return
            time.sleep(0.3)
        raise AssertionError(f"the server did not answer in {timeout_s} s: {self.log}")

    def _answers(self) -> bool:
        context = ssl.create_default_context(cafile=self.ca)
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw,
                context.wrap_socket(raw, server_hostname="127.0.0.1"),
            ):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


__all__ = ["GridappsdServer", "find_python310", "server_venv"]
