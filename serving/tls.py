"""HTTPS: the certificate and key uvicorn serves, checked before any server process
starts.

With `TEXTOPS_TLS_CERT_FILE` and `TEXTOPS_TLS_KEY_FILE`, `python -m serving` hands
uvicorn `ssl_certfile` and `ssl_keyfile`; every worker (serving/processes/supervisor.py)
builds its own TLS context from them over its own socket, so no port of the service
speaks plain HTTP, and a plain-HTTP request fails the handshake. Python's server
context accepts TLS 1.2 and 1.3 only. The files are read once at start: a renewed
certificate takes a restart (in Kubernetes, a rollout).

`check` loads the pair once in the supervisor: a wrong path, a key that is not the
certificate's, or a passphrase-protected key stops the service with one line naming
the files, where each worker failing on its own would only be restarted again and
again.
"""

from __future__ import annotations

import ssl

from serving.settings import ENV_PREFIX, Settings, SettingsError


def server_options(settings: Settings) -> dict:
    """uvicorn.Config keywords for HTTPS, or {} for plain HTTP; SettingsError when the
    certificate and key cannot serve."""
    if not settings.tls_cert_file:
        return {}
    check(settings.tls_cert_file, settings.tls_key_file)
    return {"ssl_certfile": settings.tls_cert_file, "ssl_keyfile": settings.tls_key_file}


def check(cert_file: str, key_file: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # no password callback: an encrypted key fails here instead of prompting
        context.load_cert_chain(cert_file, key_file, password=lambda: b"")
    except (OSError, ssl.SSLError) as err:
        raise SettingsError(f"{ENV_PREFIX}TLS_CERT_FILE={cert_file!r} with "
                            f"{ENV_PREFIX}TLS_KEY_FILE={key_file!r}: cannot serve HTTPS "
                            f"({err})") from None
