"""Signed bundles: OpenSSF model signing (the `model-signing` package) with a local
elliptic-curve key.

The deploy stage signs every bundle it registers and promotes (its keys:
pipeline/tracking/signing.py). The signature, `model.sig` inside the bundle, is a
Sigstore bundle whose DSSE envelope holds an in-toto statement listing each file of the
bundle with its sha256. With `TEXTOPS_BUNDLE_PUBLIC_KEY` the service verifies a bundle
before loading it, at start and on every reload (serving/engine/following.py), and
`textops deploy` verifies the champion before serving it: a bundle changed since it
was signed is refused, naming each file added, removed or modified.

Two files stay outside the signature: `model.sig` itself, and `registry.json`, which
the registry writes beside a promoted copy after signing (its registry version, run
and commit, which /metadata shows; nothing the model runs on). The list is part of the
signed statement, so it cannot be widened afterwards. The package's own command checks
a bundle without this code, given the directory itself (it refuses a symlink such as
models/current):

    model_signing verify key "$(readlink -f models/current)" \\
        --signature models/current/model.sig --public_key keys/bundle-signing.pub

model-signing (with Sigstore's libraries) is imported only to sign or verify: a service
without a key never loads it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from serving.bundle.bundle import BundleError

SIGNATURE = "model.sig"
# Written beside a bundle after it is signed (see above).
UNSIGNED = (SIGNATURE, "registry.json")


class SignatureError(BundleError):
    """A bundle that is unsigned, signed by another key, or changed since signing."""


def hashing_config():
    """Every file of the bundle but UNSIGNED, by sha256 (the package's default)."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=list(UNSIGNED))


def sign(bundle_dir: str | Path, private_key: str | Path) -> Path:
    """Write `model.sig` into `bundle_dir`, signed with the PEM EC key `private_key`."""
    import model_signing

    bundle_dir = Path(bundle_dir)
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key) \
        .set_hashing_config(hashing_config()).sign(bundle_dir, bundle_dir / SIGNATURE)
    return bundle_dir / SIGNATURE


def verify(bundle_dir: str | Path, public_key: str | Path) -> None:
    """SignatureError unless `bundle_dir` is exactly what the holder of the private key
    of `public_key` (a PEM file) signed."""
    import model_signing
    from cryptography.exceptions import InvalidSignature

    bundle_dir = Path(bundle_dir)
    signature = bundle_dir / SIGNATURE
    if not signature.is_file():
        raise SignatureError(f"{signature}: missing: the bundle is not signed, and "
                             f"TEXTOPS_BUNDLE_PUBLIC_KEY ({public_key}) asks for a signature")
    try:
        verifier = model_signing.verifying.Config().use_elliptic_key_verifier(
            public_key=public_key)
    except (OSError, ValueError) as err:
        raise SignatureError(f"{public_key}: not a usable public key ({err})") from None
    try:
        verifier.verify(bundle_dir, signature)
    except InvalidSignature:
        raise SignatureError(f"{signature}: the signature is not valid for {public_key} "
                             "(model.sig was altered, or made with another key)") from None
    except ValueError as err:
        if str(err).startswith("Signature mismatch"):  # authentic, but the files changed
            raise SignatureError(f"{bundle_dir}: changed since it was signed: "
                                 f"{'; '.join(changes(bundle_dir, signature))}") from None
        if str(err).startswith("Key mismatch"):
            raise SignatureError(f"{signature}: signed with another key than "
                                 f"{public_key}") from None
        raise SignatureError(f"{signature}: cannot be verified ({err})") from None
    except Exception as err:  # noqa: BLE001 - a malformed model.sig: any parser error
        raise SignatureError(f"{signature}: cannot be read as a signature "
                             f"({type(err).__name__}: {err})") from None


def changes(bundle_dir: Path, signature: Path) -> list[str]:
    """What differs between the files signed (the statement in `signature`, whose
    signature has been checked) and the files there now, one line per file."""
    envelope = json.loads(signature.read_text(encoding="utf-8"))["dsseEnvelope"]
    statement = json.loads(base64.b64decode(envelope["payload"]))
    signed = {r["name"]: r["digest"] for r in statement["predicate"]["resources"]}
    present = {r.identifier: r.digest.digest_hex
               for r in hashing_config().hash(bundle_dir).resource_descriptors()}
    found = [f"{name} modified" for name in sorted(signed.keys() & present.keys())
             if signed[name] != present[name]]
    found += [f"{name} added" for name in sorted(present.keys() - signed.keys())]
    found += [f"{name} removed" for name in sorted(signed.keys() - present.keys())]
    return found or ["the files do not match the signed list"]
