"""Signed bundles (serving/bundle/signature.py): a bundle signed with the deploy
stage's key verifies; one altered since (a file modified, added or removed), signed
with another key, or not signed at all is refused, by the service at start and on a
reload, and by `make deploy`'s `control.up`, naming what changed."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, running_service

from ops import container, control, runtimes
from pipeline.tracking.signing import SigningKeyError, ensure_key_pair, signed_copy
from serving.bundle import signature as signature_module
from serving.bundle.signature import SIGNATURE, SignatureError, verify

ADMIN = {"Authorization": "Bearer t"}


def key_pair(directory: Path, name: str = "bundle-signing") -> tuple[Path, Path]:
    private, public = directory / f"{name}.pem", directory / f"{name}.pub"
    assert ensure_key_pair(private, public)
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def signed(built_bundle, keys, tmp_path_factory) -> Path:
    """The built bundle, signed (as the deploy stage signs what it registers)."""
    return signed_copy(built_bundle[0], tmp_path_factory.mktemp("signed") / "bundle", keys[0])


@pytest.fixture
def altered(signed, tmp_path) -> Path:
    """A copy of the signed bundle, for a test to change."""
    return Path(shutil.copytree(signed, tmp_path / "altered"))


def refusal(bundle: Path, public_key: Path) -> str:
    with pytest.raises(SignatureError) as failure:
        verify(bundle, public_key)
    return str(failure.value)


# ---------------------------------------------------------------- verification


def test_a_signed_bundle_verifies_and_its_registry_record_may_be_added(signed, keys,
                                                                       altered):
    verify(signed, keys[1])
    assert (signed / SIGNATURE).stat().st_mode & 0o777 == 0o644
    # the registry writes registry.json beside a promoted copy, after signing
    (altered / "registry.json").write_text('{"registry_version": "3"}')
    verify(altered, keys[1])


def test_every_changed_file_is_named(altered, keys):
    with open(altered / "model.int8.onnx", "ab") as model:
        model.write(b"\0")  # one byte appended
    meta = json.loads((altered / "bundle.json").read_text())
    meta["label_names"] = meta["label_names"][::-1]
    (altered / "bundle.json").write_text(json.dumps(meta))
    (altered / "MODEL_CARD.md").unlink()
    (altered / "extra.py").write_text("import os\n")
    said = refusal(altered, keys[1])
    assert said == (f"{altered}: changed since it was signed: bundle.json modified; "
                    "model.int8.onnx modified; extra.py added; MODEL_CARD.md removed")


def test_another_key_an_unsigned_bundle_and_a_forged_list_are_refused(altered, keys,
                                                                      tmp_path):
    _, other = key_pair(tmp_path, "other")
    assert "signed with another key than" in refusal(altered, other)
    # a list of files rewritten to match altered files: the signature no longer fits
    signature = json.loads((altered / SIGNATURE).read_text())
    statement = json.loads(base64.b64decode(signature["dsseEnvelope"]["payload"]))
    statement["predicate"]["resources"][0]["digest"] = "0" * 64
    signature["dsseEnvelope"]["payload"] = base64.b64encode(
        json.dumps(statement).encode()).decode()
    (altered / SIGNATURE).write_text(json.dumps(signature))
    assert "the signature is not valid for" in refusal(altered, keys[1])
    (altered / SIGNATURE).unlink()
    assert f"{altered / SIGNATURE}: missing: the bundle is not signed" \
        in refusal(altered, keys[1])


def test_a_missing_public_key_is_named(signed, tmp_path):
    assert f"{tmp_path / 'none.pub'}: not a usable public key" \
        in refusal(signed, tmp_path / "none.pub")


def documented_commands() -> list[str]:
    """The `model_signing verify` command lines of docs/deployment.md and of
    serving/bundle/signature.py, as a shell would read them."""
    page = (ROOT / "docs" / "deployment.md").read_text()
    (inline,) = re.findall(r"`(model_signing verify key[^`]+)`", page)
    (block,) = re.findall(r"^ *(model_signing verify key.+?\.pub)$", signature_module.__doc__,
                          re.M | re.S)
    return [" ".join(inline.split()), block]


@pytest.mark.parametrize("where", ["docs/deployment.md", "serving/bundle/signature.py"])
def test_the_documented_command_verifies_the_served_bundle(where, signed, keys, tmp_path):
    """Run where `make deploy` runs: models/current, a link the package refuses to
    follow; registry.json beside the promoted copy."""
    target = Path(shutil.copytree(signed, tmp_path / "models" / "bundles" / "3"))
    (target / "registry.json").write_text('{"registry_version": "3"}')
    (tmp_path / "models" / "current").symlink_to("bundles/3")
    (tmp_path / "keys").mkdir()
    shutil.copy(keys[1], tmp_path / "keys" / "bundle-signing.pub")
    command = documented_commands()[where.startswith("serving")]
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                     f"{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_key_pair_is_made_once_and_the_private_key_kept_private(tmp_path):
    private, public = key_pair(tmp_path / "keys")
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    first = private.read_bytes()
    public.unlink()
    assert not ensure_key_pair(private, public)  # kept; its public key written again
    assert private.read_bytes() == first and public.exists()


def test_a_public_key_of_another_private_key_is_refused(tmp_path):
    private, public = key_pair(tmp_path / "keys")
    mine = public.read_bytes()
    _, other = key_pair(tmp_path / "other")
    public.write_bytes(other.read_bytes())  # a stray .pub, say an older pair's
    with pytest.raises(SigningKeyError, match=f"{public} is not the public key of "
                                              f"{private}: .* Delete {public}"):
        ensure_key_pair(private, public)
    assert public.read_bytes() == other.read_bytes()  # not overwritten
    public.write_bytes(b"# the team's key\n" + mine)  # the same key, another layout
    assert not ensure_key_pair(private, public)


# ---------------------------------------------------------------- the service


@pytest.mark.slow
def test_the_service_serves_a_signed_bundle_and_refuses_altered_ones(signed, keys, altered,
                                                                     tmp_path):
    with open(altered / "model.int8.onnx", "ab") as model:
        model.write(b"\0")
    unsigned = Path(shutil.copytree(signed, tmp_path / "unsigned"))
    (unsigned / SIGNATURE).unlink()
    with running_service(signed, tmp_path / "good", workers=1, admin_token="t",
                         bundle_public_key=keys[1]) as service:
        for bundle, said in ((altered, "model.int8.onnx modified"),
                             (unsigned, "the bundle is not signed")):
            answer = httpx.post(f"{service.url}/admin/reload", json={"bundle": str(bundle)},
                                headers=ADMIN, timeout=30)
            assert answer.status_code == 422, answer.text
            assert said in answer.json()["error"]
        ready = httpx.get(f"{service.url}/health/ready", timeout=10)
        assert ready.status_code == 200  # the signed bundle still serves
    # at start: not ready, saying which file changed
    with running_service(altered, tmp_path / "bad", wait=False, workers=1,
                         bundle_public_key=keys[1]) as service:
        body = control.wait_until(f"{service.url}/health/ready", 60, service.process,
                                  accept=lambda status, body: status == 503
                                  and body.get("status") == "failed")
        assert f"{altered}: changed since it was signed: model.int8.onnx modified" \
            in body["error"]
    assert "model.int8.onnx modified" in (tmp_path / "bad" / "service.log").read_text()


# ---------------------------------------------------------------- make deploy


def test_deploy_refuses_an_altered_bundle_before_starting_anything(altered, keys, tmp_path,
                                                                   monkeypatch):
    (altered / "bundle.json").write_text((altered / "bundle.json").read_text() + " ")
    monkeypatch.setattr(runtimes, "find_runtime", lambda choice: pytest.fail("started"))
    with pytest.raises(RuntimeError, match=r"refusing to serve .*altered: changed since it "
                                           r"was signed: bundle.json modified"):
        control.up(altered, control.free_port(), tmp_path / "run", "127.0.0.1", 10,
                   public_key=keys[1])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_deploy_serves_a_signed_bundle_with_the_key(signed, keys, altered, tmp_path,
                                                    monkeypatch):
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG", "")  # not the repository's run/
    monkeypatch.setenv("TEXTOPS_ADMIN_TOKEN", "t")
    (altered / "bundle.json").write_text((altered / "bundle.json").read_text() + " ")
    run_dir = tmp_path / "run"
    try:
        url, _ = control.up(signed, control.free_port(), run_dir, "127.0.0.1", 60,
                            runtime_choice="process", public_key=keys[1])
        assert control.http_json("GET", f"{url}/health/ready")[0] == 200
        # the service itself was given the key: it refuses an altered bundle too
        answer = httpx.post(f"{url}/admin/reload", json={"bundle": str(altered)},
                            headers=ADMIN, timeout=30)
        assert answer.status_code == 422 and "bundle.json modified" in answer.json()["error"]
    finally:
        control.down(run_dir)


def test_the_container_gets_the_key_mounted_read_only(keys):
    args = container.run_args(runtimes.Runtime("docker"), "textops-serving", "t", 8000,
                              files={"TEXTOPS_BUNDLE_PUBLIC_KEY": keys[1]})
    inside = "/etc/textops/textops_bundle_public_key"
    assert args[args.index(f"{keys[1].resolve()}:{inside}:ro") - 1] == "--volume"
    assert args[args.index(f"TEXTOPS_BUNDLE_PUBLIC_KEY={inside}") - 1] == "--env"
