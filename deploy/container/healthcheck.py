"""The container's health check: exit 0 when the headend's ``GET /healthz`` answers 200.

Stdlib only, so the image needs no curl. It asks the headend on loopback, over HTTPS when
``HEADEND_TLS_CERT`` is set (the certificate names the public host, not 127.0.0.1, and
this probe only asks whether this process is up, so it does not verify it), on the port of
``HEADEND_HTTP_ADDR``. A 503 (storage down, telemetry writes stalled) is unhealthy and
prints the headend's reason.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.error
import urllib.request


def main() -> int:
    addr = os.environ.get("HEADEND_HTTP_ADDR", "").strip() or "127.0.0.1:3001"
    port = addr.rpartition(":")[2]
    tls = bool(os.environ.get("HEADEND_TLS_CERT", "").strip())
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz"
    context = ssl._create_unverified_context() if tls else None  # not verified: see above
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        reason = json.loads(exc.read() or b"{}").get("reason")
        print(f"{url}: {exc.code} {reason or exc.reason}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    print(f"{url}: {body.get('status')}, {body.get('agents_connected')} agents connected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
