"""The image's HEALTHCHECK (Dockerfile): exit 0 when GET /health/live answers 200 on
this container's own port, over HTTPS when the service serves it
(`TEXTOPS_TLS_CERT_FILE`, serving/tls.py), else plain HTTP.

The certificate is not verified: the check talks to its own process over loopback, and
asks whether it answers, not who it is; a certificate names the service's public
host, rarely 127.0.0.1. The standard library only, and quick: it runs every 10 s.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("TEXTOPS_PORT", "8000")
    context = None
    if os.environ.get("TEXTOPS_TLS_CERT_FILE", "").strip():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    scheme = "https" if context else "http"
    try:
        with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health/live", timeout=2,
                                    context=context) as answer:
            return 0 if answer.status == 200 else 1
    except OSError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
