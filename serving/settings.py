"""Service settings, from environment variables prefixed `TEXTOPS_`.

Example: `TEXTOPS_BUNDLE=models/current TEXTOPS_PORT=8000 python -m serving`.
`TEXTOPS_BUNDLE` is a bundle directory (or a symlink to one, such as
`models/current`) or a registry URI `models:/<name>@<alias>`, fetched through MLflow
from `MLFLOW_TRACKING_URI`. Either way the service follows it: when the link or the
alias moves, the new bundle is loaded, warmed up and swapped in without a restart.

A bad value stops the service before it starts, naming the variable, the value and
what it should be (`Settings.from_env`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.bundle import RuntimeOptions
from serving.predlog.crypto import EITHER, LogCipher, PredictionLogKeyError, cipher_from
from serving.predlog.store import URL_FORMS, PredictionLogError, check_url

ENV_PREFIX = "TEXTOPS_"
MIN_SHADOW_CPU = 0.01  # cores: the smallest bound on the shadow worker that it can live with


class SettingsError(ValueError):
    """Settings that the service cannot run with; one line per bad variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    bundle: str = Field("models/current", description="bundle directory or models:/ URI")
    precision: str = Field("int8", pattern="^(int8|fp32)$")
    host: str = "127.0.0.1"
    port: int = 8000
    watch_interval_s: float = Field(2.0, ge=0, description="0: do not follow the bundle")
    cache_dir: str = Field(".bundle-cache", description="where registry bundles are fetched")

    # Input limits: a request over any of them is refused before it reaches the model.
    max_texts: int = Field(64, ge=1, description="texts per request")
    max_chars: int = Field(2000, ge=1, description="characters per text")
    max_body_bytes: int = Field(1_000_000, ge=1, description="request body size")
    max_images: int = Field(16, ge=1, description="images per request (an image model)")
    max_image_bytes: int = Field(1_000_000, ge=1, description="bytes per encoded image")
    # A next-word model (serving/engine/generation.py): /predict's k and /generate's
    # length. Its decoding steps take up to max_batch_size sequences and up to
    # max_queue more wait for a place; a prompt is bounded by max_chars and the
    # model's context.
    next_words: int = Field(5, ge=1, description="next words per text when /predict "
                            "names no k")
    max_next_words: int = Field(20, ge=1, description="the largest k /predict takes")
    max_new_tokens: int = Field(128, ge=1, description="tokens /generate makes per "
                                "request, at most")

    # Server processes (serving/processes/workers.py): one per core by default, since one Python
    # process answering HTTP left about half of a 2-core machine idle.
    workers: int = Field(0, ge=0, description="server processes; 0: one per core")
    worker_timeout_s: float = Field(30.0, gt=0, description="a worker whose event loop "
                                    "is silent this long is killed and replaced")

    # Dynamic batching and backpressure.
    batching: bool = True
    max_batch_size: int = Field(64, ge=1, description="texts per model call")
    # 0: a batch is whatever queued while the model ran the previous one. Waiting for
    # companions left cores idle: with 2 ms, 20-25% fewer texts/s at 1 text x 32
    # clients and no gain anywhere in bench/bench_serving.py's table; it can still pay
    # for open-loop traffic whose requests arrive within a few ms of each other.
    max_wait_ms: float = Field(0.0, ge=0, description="wait for companions, under load only")
    max_queue: int = Field(512, ge=1, description="texts waiting; more is answered 503")
    request_timeout_s: float = Field(10.0, gt=0, description="answered 504 after this")
    inference_threads: int = Field(1, ge=1, description="batches run in parallel")
    # Python hands the GIL to a waiting thread only every switch interval (5 ms by
    # default); under load the event loop holds it, so the inference thread waited and
    # a third of the cores sat idle. 0.1 ms: 9-37% more texts/s at c=32 (7 A/B pairs).
    switch_interval_ms: float = Field(0.1, gt=0, description="GIL switch interval")

    # onnxruntime. 0 intra-op threads: the cores divided among the workers.
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    graph_optimization: str = Field("all", pattern="^(disable|basic|extended|all)$")
    spin_wait: bool = False

    # Security: both off by default.
    admin_token: str | None = Field(None, description="enables POST /admin/reload")
    api_keys: str | None = Field(None, description="comma-separated keys for prediction routes")
    # Encryption in transit (serving/tls.py): with a certificate and its key every server
    # process speaks HTTPS only. Empty: plain HTTP, unless REQUIRE_TLS refuses to start.
    tls_cert_file: str = Field("", description="PEM certificate (chain) served for HTTPS")
    tls_key_file: str = Field("", description="PEM private key of the certificate")
    require_tls: bool = Field(False, description="refuse to start without a certificate")
    # Signed bundles (serving/bundle/signature.py): with a public key, a bundle whose
    # model.sig it does not verify is refused at start and on every reload.
    bundle_public_key: str = Field("", description="PEM public key bundles are signed for")

    drift_window: int = Field(2000, ge=10, description="recent texts compared with training")

    # Shadow mode (serving/engine/shadow.py): a challenger scores every answered
    # request off the request path; its answers are logged beside the champion's.
    challenger: str | None = Field(None, description="a bundle directory or models:/ URI "
                                   "scored in shadow beside the one served")
    shadow_queue: int = Field(1000, ge=1, description="texts waiting for the challenger; "
                              "more are dropped and counted, never delayed")
    shadow_cpu: float = Field(0, ge=0, le=1, description="the most CPU each server "
                              "process's challenger worker takes, in cores (0.25: a quarter "
                              "of one; it runs one thread, so 1 bounds nothing); 0: whatever "
                              "the machine leaves idle")
    # Canary mode (serving/engine/canary.py): the challenger answers a share instead.
    challenger_mode: str = Field("shadow", pattern="^(shadow|canary)$",
                                 description="shadow: scored beside every answer; canary: "
                                 "answers canary_share of the requests")
    canary_share: float = Field(0.1, gt=0, lt=1, description="canary mode: the share of "
                                "client keys (X-Client-Key) the challenger answers")
    canary_max_failures: int = Field(5, ge=1, description="canary mode: requests the "
                                     "challenger may fail (the champion answers them) "
                                     "among its latest canary_window before the canary "
                                     "stops")
    canary_max_p99_ratio: float = Field(2.0, ge=0, description="canary mode: the most the "
                                        "challenger's p99 latency over its latest "
                                        "canary_window requests may be, as a multiple of "
                                        "the champion's over theirs, before the canary "
                                        "stops; 0: no latency guard")
    canary_window: int = Field(200, ge=1, description="canary mode: the latest requests "
                               "of each model that the guards look at")

    # The prediction log and feedback (serving/predlog/).
    prediction_log: str = Field("sqlite:///run/predictions.db",
                                description="sqlite:///<path> (relative to the working "
                                "directory), postgresql://..., or empty: no log")
    prediction_log_queue: int = Field(10_000, ge=1, description="entries waiting to be "
                                      "written (a request's answers, or a challenger's "
                                      "batch); more are dropped and counted")
    prediction_log_sample: float = Field(1.0, ge=0, le=1, description="share of requests "
                                         "logged, chosen by a hash of the request id")
    prediction_log_retention_days: float = Field(30, gt=0, description="older rows deleted")
    prediction_log_max_rows: int = Field(1_000_000, ge=1, description="the oldest rows "
                                         "beyond this are deleted")
    feedback_window: int = Field(1000, ge=1, description="latest labels live accuracy "
                                 "rests on")
    # What the log keeps of an image (an image model): its file's sha256 only, or also
    # a thumbnail, the image as the model saw it (the bundle's size and channels, a
    # PNG), which `make retrain` can train on once it is labelled.
    prediction_log_images: str = Field("hash", pattern="^(hash|thumbnail)$",
                                       description="hash: a sha256 per image; thumbnail: "
                                       "also the converted image, as PNG")
    # Encryption at rest of the logged texts (serving/predlog/crypto.py): on when keys
    # are given. Secret: kept out of reprs, and a bad key is named by its position only.
    prediction_log_keys: SecretStr | None = Field(None, description="comma-separated "
                                                  "Fernet keys, newest first")
    prediction_log_key_file: str | None = Field(None, description="a file of Fernet keys, "
                                                "one a line, newest first (a mounted secret)")
    # Without keys a log is written in plaintext; the start's check (crypto.check_log)
    # only notices missing keys once the log holds an encrypted row. Where encryption
    # is mandatory (a new log, a Secret that did not mount), this refuses to start.
    require_log_encryption: bool = Field(False, description="refuse to start with a "
                                         "prediction log and no keys")

    @field_validator("prediction_log")
    @classmethod
    def _a_database_url(cls, url: str) -> str:
        try:
            return check_url(url.strip()) if url.strip() else ""
        except PredictionLogError:
            raise ValueError(f"expected {URL_FORMS}, or empty for no log") from None

    @model_validator(mode="after")
    def _log_keys_load(self):
        # a model validator: its error shows no input, which would be the keys
        try:
            cipher = self.log_cipher()
        except PredictionLogKeyError as err:
            raise ValueError(str(err)) from None
        if self.require_log_encryption and self.prediction_log and cipher is None:
            raise ValueError(f"{ENV_PREFIX}REQUIRE_LOG_ENCRYPTION is on: set {EITHER} (the "
                             "prediction log's keys), or its texts would be stored in "
                             "plaintext")
        return self

    @model_validator(mode="after")
    def _limits_fit_the_queue(self):
        if self.max_texts > self.max_queue:
            raise ValueError(f"{ENV_PREFIX}MAX_TEXTS ({self.max_texts}) must not exceed "
                             f"{ENV_PREFIX}MAX_QUEUE ({self.max_queue})")
        return self

    @model_validator(mode="after")
    def _default_k_within_bound(self):
        if self.next_words > self.max_next_words:
            raise ValueError(f"{ENV_PREFIX}NEXT_WORDS ({self.next_words}) must not exceed "
                             f"{ENV_PREFIX}MAX_NEXT_WORDS ({self.max_next_words})")
        return self

    @field_validator("shadow_cpu")
    @classmethod
    def _off_or_a_usable_share(cls, cores: float) -> float:
        # a sliver would rest for hours after each batch: every offer dropped, and a
        # close that can only kill it
        if 0 < cores < MIN_SHADOW_CPU:
            raise ValueError(f"0 (no bound) or at least {MIN_SHADOW_CPU} cores")
        return cores

    @field_validator("tls_cert_file", "tls_key_file", "bundle_public_key")
    @classmethod
    def _a_readable_file(cls, path: str) -> str:
        path = path.strip()
        if path and not os.access(path, os.R_OK):
            raise ValueError("no such file, or not readable by this user")
        return path

    @model_validator(mode="after")
    def _tls_is_whole(self):
        cert, key = f"{ENV_PREFIX}TLS_CERT_FILE", f"{ENV_PREFIX}TLS_KEY_FILE"
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError(f"{cert} and {key} go together: HTTPS needs both")
        if self.require_tls and not self.tls_cert_file:
            raise ValueError(f"{ENV_PREFIX}REQUIRE_TLS is on: set {cert} and {key} (a "
                             "certificate and its private key), or the service would "
                             "serve plain HTTP")
        return self

    @classmethod
    def from_env(cls) -> Settings:
        """The settings from the environment; SettingsError says what is wrong."""
        try:
            return cls()
        except ValidationError as err:
            raise SettingsError(describe(err)) from None

    def worker_count(self) -> int:
        return self.workers or available_cores()

    def runtime_options(self, workers: int = 1) -> RuntimeOptions:
        """onnxruntime's options for one of `workers` server processes: workers that
        each took every core for one model call would fight over them."""
        threads = self.intra_op_threads or (
            max(1, available_cores() // workers) if workers > 1 else 0)
        return RuntimeOptions(
            intra_op_threads=threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            spin_wait=self.spin_wait,
        )

    def api_key_list(self) -> list[str]:
        return [key.strip() for key in (self.api_keys or "").split(",") if key.strip()]

    def log_cipher(self) -> LogCipher | None:
        """The prediction log's cipher; None: its texts are stored as they are."""
        keys = self.prediction_log_keys
        return cipher_from(keys.get_secret_value() if keys else None,
                           self.prediction_log_key_file)


def available_cores() -> int:
    """The cores this process may use: its affinity mask (a cpuset), bounded by a CPU
    quota (`docker --cpus`, a Kubernetes CPU limit: cgroup v2's cpu.max), which the
    mask does not show."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def describe(err: ValidationError) -> str:
    """Each problem as `TEXTOPS_NAME='value': what it should be`."""
    lines = []
    for problem in err.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            variable = ENV_PREFIX + str(problem["loc"][0]).upper()
            message = f"{variable}={problem['input']!r}: {message}"
        lines.append(message)
    return "invalid settings\n  " + "\n  ".join(lines)
