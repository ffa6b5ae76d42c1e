"""Service settings, from environment variables prefixed `TEXTOPS_`.

Example: `TEXTOPS_BUNDLE=models/current TEXTOPS_PORT=8000 uvicorn serving.app:app`.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.bundle import RuntimeOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEXTOPS_", extra="ignore")

    bundle: str = Field("models/current", description="bundle directory to serve")
    precision: str = Field("int8", pattern="^(int8|fp32)$")
    host: str = "127.0.0.1"
    port: int = 8000

    # Input limits: a request over any of them is refused before it reaches the model.
    max_texts: int = Field(64, ge=1, description="texts per request")
    max_chars: int = Field(2000, ge=1, description="characters per text")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body size")

    # onnxruntime
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")
    spin_wait: bool = False

    def runtime_options(self) -> RuntimeOptions:
        return RuntimeOptions(
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            spin_wait=self.spin_wait,
        )
