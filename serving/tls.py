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

`self_signed` makes a throw-away certificate that a client trusts as its only root:
the tests' HTTPS, and each federated run's gRPC (pipeline/modeling/federated/tls.py).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

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


def self_signed(hosts: tuple[str, ...], valid: dt.timedelta) -> tuple[bytes, bytes]:
    """(certificate, private key), PEM: a P-256 server certificate for `hosts` (names
    or IP addresses) that signs itself, for a client to trust as its only root. It is
    not a CA: its key signs TLS handshakes, never other certificates."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + valid)
        .add_extension(x509.SubjectAlternativeName([_host(host) for host in hosts]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _host(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)
