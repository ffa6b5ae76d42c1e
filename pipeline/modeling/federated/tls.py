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

from serving.tls import self_signed

HOST = "127.0.0.1"


def run_certificate() -> tuple[bytes, bytes]:
    """(certificate, private key), PEM: this run's server certificate for HOST, which
    signs itself and which the clients take as their one trusted root."""
    return self_signed((HOST,), valid=dt.timedelta(days=7))


def server_certificates(certificate: bytes, key: bytes) -> tuple[bytes, bytes, bytes]:
    """What Flower's gRPC server takes: (root, certificate, key); the root would check
    client certificates, which this federation does not ask for."""
    return certificate, certificate, key
