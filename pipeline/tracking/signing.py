"""The keys the deploy stage signs bundles with, and the signed copy it registers.

`deploy.signing_key` (conf/config.yaml) names a PEM elliptic-curve (P-256) private key;
its public key is the same path with `.pub`. Where neither exists, the first deploy
makes the pair (the private key readable by its owner only), so a fresh clone's `make
deploy` needs no step by hand; `keys/` is git-ignored. A team points the setting at its
own key instead (see docs/deployment.md), and gives the public key to the services
(`TEXTOPS_BUNDLE_PUBLIC_KEY`).

The stage's own output, `models/candidate`, stays unsigned: a signature differs with
each key (each clone makes its own) and each signing (ECDSA is randomised), and the
candidate must be the same bytes in every clone (dvc.lock repeats, docs/reproducibility.md).
What leaves the stage is signed: `signed_copy` is what the registry stores and
`models/current` serves (serving/bundle/signature.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from pipeline.config import Paths
from serving.bundle.signature import SIGNATURE, sign


def key_paths(cfg: DictConfig, paths: Paths) -> tuple[Path, Path]:
    """(private key, public key): `deploy.signing_key`, relative to the repository
    unless absolute, and the same with `.pub`."""
    private = Path(cfg.deploy.signing_key)
    private = private if private.is_absolute() else paths.root / private
    return private, private.with_suffix(".pub")


class SigningKeyError(RuntimeError):
    """A key pair that does not belong together; the message says how to mend it."""


def ensure_key_pair(private: Path, public: Path) -> bool:
    """Make a P-256 key pair where there is no private key yet; True if it made one.
    A private key without its public key gets the public key written again; one with a
    public key of another key is an error (SigningKeyError), not a rewrite: services
    given that .pub would refuse every bundle signed from now on, and which of the two
    files is the stray one only their owner knows."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    made = not private.exists()
    if made:
        private.parent.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # created 0600: the key is never readable by others, not even for a moment
        descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(pem)
    derived = serialization.load_pem_private_key(private.read_bytes(), password=None
                                                 ).public_key()
    if made or not public.exists():
        public.write_bytes(derived.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        public.chmod(0o644)  # the container's user reads it (ops/container.py)
    elif not same_key(public, derived):
        raise SigningKeyError(
            f"{public} is not the public key of {private}: bundles signed now would not "
            f"verify with it. Delete {public} to have it written again from {private}, or "
            f"put back the private key it belongs to")
    return made


def same_key(public: Path, derived) -> bool:
    """Whether the PEM file `public` holds the public key `derived` (compared as DER,
    so a file with other line breaks or comments still matches)."""
    from cryptography.hazmat.primitives import serialization

    der = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        found = serialization.load_pem_public_key(public.read_bytes())
    except ValueError:  # not a PEM public key at all
        return False
    return found.public_bytes(*der) == derived.public_bytes(*der)


def signed_copy(bundle_dir: Path, destination: Path, private: Path) -> Path:
    """`bundle_dir` copied to `destination` with its signature, `model.sig`."""
    shutil.copytree(bundle_dir, destination, ignore=shutil.ignore_patterns(SIGNATURE))
    sign(destination, private)
    (destination / SIGNATURE).chmod(0o644)  # readable by every user, as the bundle is
    return destination
