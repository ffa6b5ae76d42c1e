"""Where the bundle comes from, and how to tell that it changed.

- A directory, or a symlink to one (`models/current`): its identity is the resolved
  path, which changes when the deploy stage swaps the link.
- A registry URI `models:/<name>@<alias>` or `models:/<name>/<version>`: its identity
  is the registered version; the bundle is fetched through MLflow (from
  `MLFLOW_TRACKING_URI`, typically a shared `mlflow server`) into a local cache.
  MLflow is imported only for such URIs, so the plain image does not need it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from serving.bundle import REGISTERED_BUNDLE

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
        """A local directory holding the bundle of `identity`."""
        if not self.is_registry:
            return Path(identity)
        target = self.cache_dir / identity.replace("/", "-")
        if not (target / "bundle.json").exists():
            import mlflow

            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{REGISTRY_PREFIX}{identity}", dst_path=str(partial))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(Path(local) / REGISTERED_BUNDLE, target)
            shutil.rmtree(partial, ignore_errors=True)
        return target

    def _registry_version(self) -> tuple[str, str]:
        from mlflow import MlflowClient

        ref = self.spec[len(REGISTRY_PREFIX):]
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return name, str(MlflowClient().get_model_version_by_alias(name, alias).version)
        name, version = ref.rsplit("/", 1)
        return name, version
