"""TLS for a real-client federation's gRPC on loopback: a certificate made for one run.

Model updates can leak the rows they were trained on, so they do not travel in
plaintext, not even between processes of one machine: another local user could read
loopback traffic or bind the port first. The train stage makes a P-256 key and a
certificate for 127.0.0.1 that signs itself; the server holds the key in memory only,
and each client is given the certificate (public) as the one root it trusts, so a
client talks only to this run's server and nobody else can read what they exchange.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"


def run_certificate(valid: dt.timedelta = dt.timedelta(days=7)) -> tuple[bytes, bytes]:
    """(certificate, private key), PEM: a self-signed certificate for HOST. It is its
    own root (CA), as gRPC takes the clients' trusted roots and the server's chain
    apart."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "textops federation")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + valid)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_certificates(certificate: bytes, key: bytes) -> tuple[bytes, bytes, bytes]:
    """What Flower's gRPC server takes: (root, certificate, key); the root would check
    client certificates, which this federation does not ask for."""
    return certificate, certificate, key
