"""TLS for a real-client federation's gRPC on loopback: a certificate made for one run.

Model updates can leak the rows they were trained on. Over plain gRPC, a process that
took the port first could pose as the server and collect every client's update, and
anyone able to capture loopback traffic could read them. The train stage makes a P-256
key and a certificate for 127.0.0.1 that signs itself; the server holds the key in
memory only, and each client trusts that certificate alone, so a client sends its
update only to this run's server, encrypted. The server does not authenticate its
clients (Flower's gRPC server asks for no client certificates): a local process that
connects can join the rounds, as on plain gRPC.
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
    """(certificate, private key), PEM: a server certificate for HOST that signs
    itself, which the clients take as their one trusted root."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "textops federation")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + valid)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False,
                                     decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256()))
    return (certificate.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def server_certificates(certificate: bytes, key: bytes) -> tuple[bytes, bytes, bytes]:
    """What Flower's gRPC server takes: (root, certificate, key); the root would check
    client certificates, which this federation does not ask for."""
    return certificate, certificate, key
