"""What `make deploy` (ops/control.py) hands the container it starts: the settings a
local process would inherit from the environment. The prediction log's key file is
mounted read-only, and its keys and the TLS and encryption requirements are passed by
name (`--env NAME`), so that no key shows on a command line. Quick: the runtime's `run`
is recorded, not run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from ops import container, control, runtimes

KEY = Fernet.generate_key().decode()
PASSED = ("TEXTOPS_PREDICTION_LOG_KEYS", "TEXTOPS_REQUIRE_TLS",
          "TEXTOPS_REQUIRE_LOG_ENCRYPTION")


@pytest.fixture
def started(tmp_path, monkeypatch) -> list[list[str]]:
    """The argument lists of every `docker` command `control.up` runs; the image build,
    the readiness wait and stopping are no-ops."""
    for name in (*container.FILE_SETTINGS, *PASSED, "TEXTOPS_BUNDLE_PUBLIC_KEY"):
        monkeypatch.delenv(name, raising=False)
    calls: list[list[str]] = []
    monkeypatch.setattr(runtimes, "find_runtime", lambda choice: runtimes.Runtime("docker"))
    monkeypatch.setattr(runtimes.Runtime, "run", lambda self, *args, **kw: calls.append(args))
    monkeypatch.setattr("ops.image.build", lambda *args, **kwargs: None)
    monkeypatch.setattr(container, "stop", lambda *args, **kwargs: None)
    monkeypatch.setattr(control, "wait_ready", lambda *args, **kwargs: {})
    return calls


def up(tmp_path: Path, calls: list) -> list[str]:
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o755)
    (bundle / "bundle.json").write_text(json.dumps({"version": "v1"}))
    (bundle / "bundle.json").chmod(0o644)
    control.up(bundle, 8000, tmp_path / "run", "127.0.0.1", 10, runtime_choice="docker")
    (args,) = [call for call in calls if call[0] == "run"]
    return list(args)


def test_the_log_keys_and_requirements_reach_the_container_by_name(tmp_path, started,
                                                                   monkeypatch):
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG_KEYS", KEY)
    monkeypatch.setenv("TEXTOPS_REQUIRE_TLS", "false")
    monkeypatch.setenv("TEXTOPS_REQUIRE_LOG_ENCRYPTION", "true")
    args = up(tmp_path, started)
    for name in PASSED:  # the runtime copies the value from its own environment
        assert args[args.index(name) - 1] == "--env", name
    assert not any(KEY in arg for arg in args)  # never on the command line
    assert "TEXTOPS_REQUIRE_LOG_ENCRYPTION=true" not in args


def test_the_key_file_is_mounted_read_only_and_unset_settings_stay_out(tmp_path, started,
                                                                        monkeypatch):
    key_file = tmp_path / "log.keys"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o644)  # run by root, the container's own user must read it
    monkeypatch.setenv("TEXTOPS_PREDICTION_LOG_KEY_FILE", str(key_file))
    args = up(tmp_path, started)
    inside = "/etc/textops/textops_prediction_log_key_file"
    assert args[args.index(f"{key_file.resolve()}:{inside}:ro") - 1] == "--volume"
    assert args[args.index(f"TEXTOPS_PREDICTION_LOG_KEY_FILE={inside}") - 1] == "--env"
    assert not any(name in args for name in PASSED)  # not set here: nothing passed
