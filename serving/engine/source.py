"""Where the bundle comes from, and how to tell that it changed.

- A directory, or a symlink to one (`models/current`): its identity is the resolved
  path, which changes when the deploy stage swaps the link.
- A registry URI `models:/<name>@<alias>` or `models:/<name>/<version>`: its identity
  is the registered version; the bundle is fetched through MLflow (from
  `MLFLOW_TRACKING_URI`, typically a shared `mlflow server`) into a local cache.
  MLflow is imported only for such URIs, so the plain image does not need it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from serving.bundle import REGISTERED_BUNDLE
from serving.processes.workers import alive

REGISTRY_PREFIX = "models:/"


class BundleSource:
    def __init__(self, spec: str, cache_dir: str | Path = ".bundle-cache"):
        self.spec = spec
        self.cache_dir = Path(cache_dir)

    @property
    def is_registry(self) -> bool:
        return self.spec.startswith(REGISTRY_PREFIX)

    def identity(self) -> str:
        """Changes exactly when the bundle behind the spec changes."""
        if not self.is_registry:
            return os.path.realpath(self.spec)
        name, version = self._registry_version()
        return f"{name}/{version}"

    def fetch(self, identity: str) -> Path:
        """A local directory holding the bundle of `identity`.

        Several server processes may fetch the same version at once: each downloads
        into a folder of its own (`<version>.partial-<pid>`), and the first to finish
        moves it into place; a complete bundle there is never replaced or removed, since
        another process may be loading it. Folders left by a process that died while
        downloading are cleared."""
        if not self.is_registry:
            return Path(identity)
        target = self.cache_dir / identity.replace("/", "-")
        if (target / "bundle.json").exists():
            return target
        import mlflow

        self._clear_abandoned(target)
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{REGISTRY_PREFIX}{identity}", dst_path=str(partial))
            if not (target / "bundle.json").exists():
                shutil.rmtree(target, ignore_errors=True)  # a killed download's leftovers
                with contextlib.suppress(OSError):  # another process was first: fine
                    os.replace(Path(local) / REGISTERED_BUNDLE, target)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        if not (target / "bundle.json").exists():
            raise FileNotFoundError(f"{target}: the download holds no bundle.json")
        return target

    @staticmethod
    def _clear_abandoned(target: Path) -> None:
        for partial in target.parent.glob(f"{target.name}.partial-*"):
            pid = partial.name.rsplit("-", 1)[1]
            if pid.isdigit() and not alive(int(pid)):
                shutil.rmtree(partial, ignore_errors=True)

    def _registry_version(self) -> tuple[str, str]:
        from mlflow import MlflowClient

        ref = self.spec[len(REGISTRY_PREFIX):]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
        name, version = ref.rsplit("/", 1)
        return name, version
