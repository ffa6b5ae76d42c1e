"""HTTPS (serving/tls.py): the real service with a throw-away self-signed certificate
answers /predict over HTTPS on every server process, a plain-HTTP request to its port
fails, and a service told to require TLS does not start without a certificate."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, running_service

from pipeline.modeling.federated import tls as federation_tls
from serving import tls
from serving.settings import Settings, SettingsError


def self_signed(directory: Path, name: str = "tls") -> tuple[Path, Path]:
    """(certificate, key) files: a P-256 server certificate for 127.0.0.1, valid for a
    day, signed by its own key (the kind a real-client federation makes for its run)."""
    certificate, key = federation_tls.run_certificate(dt.timedelta(days=1))
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate)
    key_file.write_bytes(key)
    return cert_file, key_file


@pytest.fixture
def certificate(tmp_path) -> tuple[Path, Path]:
    return self_signed(tmp_path)


def trusting(cert_file: Path) -> ssl.SSLContext:
    """A client context that trusts only this certificate (and checks the host name)."""
    return ssl.create_default_context(cafile=str(cert_file))


@pytest.mark.slow
def test_https_with_a_self_signed_certificate(built_bundle, certificate, tmp_path,
                                              monkeypatch):
    cert_file, key_file = certificate
    # ops/process.py's readiness wait uses the standard library, which trusts what
    # OpenSSL's SSL_CERT_FILE names
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    with running_service(built_bundle[0], tmp_path, workers=2, tls_cert_file=cert_file,
                         tls_key_file=key_file) as service:
        assert service.url.startswith("https://127.0.0.1:")
        port = service.url.rsplit(":", 1)[1]
        # Fresh connections each: the kernel spreads them over the two workers'
        # sockets, so every worker has to answer over TLS (16 on one alone: 1 in 2^15).
        for _ in range(16):
            with httpx.Client(verify=trusting(cert_file), timeout=10) as client:
                answer = client.post(f"{service.url}/predict",
                                     json={"texts": ["a gripping, beautifully acted film"]})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["predictions"]) == 1
        with httpx.Client(verify=trusting(cert_file), timeout=10) as client:
            metrics = client.get(f"{service.url}/metrics").text
        # both were serving (the log says why if one was replaced)
        assert metrics.count("textops_worker_resident_bytes{") == 2, service.log_tail()
        # plain HTTP to the same port: the TLS handshake fails, nothing is answered
        for _ in range(8):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=5)
        # a client that trusts another certificate refuses the connection
        other, _ = self_signed(tmp_path, "other")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{service.url}/health/ready", timeout=5, verify=trusting(other))
        # the image's HEALTHCHECK follows the setting (serving/healthcheck.py)
        check = [sys.executable, "-m", "serving.healthcheck"]
        env = {**os.environ, "TEXTOPS_PORT": port}
        assert subprocess.run(check, env={**env, "TEXTOPS_TLS_CERT_FILE": str(cert_file)},
                              cwd=ROOT, timeout=30).returncode == 0
        assert subprocess.run(check, env={**env, "TEXTOPS_TLS_CERT_FILE": ""}, cwd=ROOT,
                              timeout=30).returncode == 1


def start_fails(tmp_path, **settings) -> str:
    """`python -m serving` with these settings; asserts it exits at once, returns what
    it said."""
    env = {**os.environ, "TEXTOPS_BUNDLE": str(tmp_path / "no-bundle"),
           "TEXTOPS_PREDICTION_LOG": "", "TEXTOPS_PORT": "1",
           **{f"TEXTOPS_{k.upper()}": str(v) for k, v in settings.items()}}
    result = subprocess.run([sys.executable, "-m", "serving"], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, result.stdout + result.stderr
    return result.stderr


def test_require_tls_without_a_certificate_refuses_to_start(tmp_path):
    said = start_fails(tmp_path, require_tls="true")
    assert "TEXTOPS_REQUIRE_TLS is on: set TEXTOPS_TLS_CERT_FILE and TEXTOPS_TLS_KEY_FILE" \
        in said
    assert "Traceback" not in said


def test_a_key_of_another_certificate_refuses_to_start(tmp_path, certificate):
    cert_file, _ = certificate
    _, other_key = self_signed(tmp_path, "other")
    said = start_fails(tmp_path, tls_cert_file=cert_file, tls_key_file=other_key)
    assert f"TEXTOPS_TLS_CERT_FILE='{cert_file}' with TEXTOPS_TLS_KEY_FILE='{other_key}': " \
           "cannot serve HTTPS" in said


@pytest.mark.parametrize("settings, said", [
    ({"tls_cert_file": "CERT"}, "TEXTOPS_TLS_CERT_FILE and TEXTOPS_TLS_KEY_FILE go together"),
    ({"tls_key_file": "KEY"}, "TEXTOPS_TLS_CERT_FILE and TEXTOPS_TLS_KEY_FILE go together"),
    ({"tls_cert_file": "/nonexistent.crt", "tls_key_file": "KEY"},
     "TEXTOPS_TLS_CERT_FILE='/nonexistent.crt': no such file"),
    ({"require_tls": "true"}, "TEXTOPS_REQUIRE_TLS is on"),
])
def test_incomplete_tls_settings_are_named(certificate, monkeypatch, settings, said):
    cert_file, key_file = certificate
    for name, value in settings.items():
        value = value.replace("CERT", str(cert_file)).replace("KEY", str(key_file))
        monkeypatch.setenv(f"TEXTOPS_{name.upper()}", value)
    with pytest.raises(SettingsError, match="invalid settings") as failure:
        Settings.from_env()
    assert said in str(failure.value)


def test_a_whole_pair_gives_uvicorn_its_files_and_no_pair_plain_http(certificate):
    cert_file, key_file = certificate
    pair = Settings(tls_cert_file=str(cert_file), tls_key_file=str(key_file),
                    require_tls=True)
    assert tls.server_options(pair) == {"ssl_certfile": str(cert_file),
                                        "ssl_keyfile": str(key_file)}
    assert tls.server_options(Settings()) == {}


@pytest.mark.parametrize("cert, scheme", [("", "http"), ("tls.crt", "https")])
def test_make_retrain_reads_the_service_as_make_deploy_serves_it(cert, scheme):
    """A certificate in the environment: `make deploy` serves HTTPS only, so `make
    retrain` must call https (printed, not run: `make -n`)."""
    env = {**os.environ, "TEXTOPS_TLS_CERT_FILE": cert}
    done = subprocess.run(["make", "-n", "-o", f"{sys.prefix}/.installed",
                           f"VENV={sys.prefix}", "PORT=8123", "retrain"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"--service-url {scheme}://127.0.0.1:8123" in done.stdout, done.stdout
