"""All configuration, from ``LOWBIT_*`` environment variables, read once."""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOWBIT_", extra="ignore")

    data_dir: Path = Field(default=Path("./lowbit-data"), description="Uploads, artifacts, SQLite file, broker.")
    database_url: str | None = Field(default=None, description="Default: SQLite file in data_dir.")
    broker_url: str | None = Field(default=None, description="Default: Celery filesystem broker in data_dir.")
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = 2 * 1024**3
    # What a model bundle (.zip/.tar: one .onnx file and its external data) may unpack to, and the largest file
    # a resumable upload (/api/v1/uploads) may announce.
    max_bundle_bytes: int = 64 * 1024**3
    # The part size of resumable uploads (at most 256 MiB): each part is one request, retried on its own.
    upload_part_bytes: int = 64 * 1024**2
    # Unfinished resumable uploads are removed this many days after they were announced (0 = never).
    upload_expiry_days: float = 7.0
    # Queue for new jobs: 'cpu' workers run everywhere; 'gpu' workers run on CUDA machines.
    default_queue: str = "cpu"
    # ONNX Runtime intra-op threads a worker uses for calibration, validation and latency.
    worker_threads: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    # 'auto': CUDA execution provider when present, else CPU. 'cpu' forces the CPU.
    worker_device: str = "auto"
    worker_concurrency: int = 1
    # Queues the embedded worker (lowbit serve) and `lowbit worker` consume by default.
    worker_queues: str = "cpu"
    # The memory a worker declares (GB) for routing large jobs (`lowbit worker --memory-gb`); unset: the
    # machine's total memory.
    worker_memory_gb: float | None = None
    # Webhooks: the HMAC-SHA256 key that signs deliveries. Unset: generated once and kept in
    # data_dir/webhook_secret (shared by the API and the workers through the data directory).
    webhook_secret: str | None = Field(default=None, repr=False)
    # Seconds to wait before each delivery attempt: the first at once, then +1 s, then +4 s.
    webhook_retry_delays_s: list[float] = Field(default_factory=lambda: [0.0, 1.0, 4.0])
    webhook_timeout_s: float = 10.0
    # Callback URLs that resolve to loopback, private, link-local or reserved addresses are refused
    # (the worker must not become a way into the internal network); true allows them, e.g. for tests.
    webhook_allow_private: bool = False
    # A running job whose worker has not reported for job_lease_s is taken as lost and queued again
    # (at most 3 attempts); workers report every job_heartbeat_s while a job runs.
    job_lease_s: float = 120.0
    job_heartbeat_s: float = 10.0
    # Each worker's main process refreshes its row in the workers table this often; it counts as alive for three
    # intervals (/readyz fails while jobs wait on a queue with no live worker).
    worker_heartbeat_s: float = 5.0
    # The engine runs each job in a child process with these limits (0 = off): address space in MB, CPU
    # seconds (all threads together) and wall-clock seconds. A job over a limit fails with out_of_memory,
    # cpu_time_exceeded or job_timeout; the worker lives on.
    job_memory_limit_mb: int = 16384
    # The largest file a job's engine may write, in MB (0 = no limit): a job past it fails with disk_full
    # instead of filling the disk.
    job_file_limit_mb: int = 0
    job_cpu_limit_s: int = 4 * 3600
    job_timeout_s: float = 3 * 3600
    # Queued jobs that no broker message carries (the API died between commit and publish, or the broker
    # lost its data) are published again once they have waited this long; workers check every lease/3 s.
    job_reconcile_after_s: float = 10.0
    # Access. A server bound to a loopback address runs keyless unless require_keys is set (every request is
    # the 'local' tenant); bound to any other address it always requires API keys (`lowbit keys create`).
    require_keys: bool = False
    # Browser sessions (after signing in with a key on /login): signed cookies valid this long.
    session_ttl_s: int = 12 * 3600
    # Per-tenant limits, unless the tenant has its own (0 = no limit): uploads (models and datasets) per
    # rolling minute, and jobs queued or running at once.
    uploads_per_minute: int = 0
    max_active_jobs: int = 0
    # Bytes of uploads (models, datasets) and job artifacts a tenant may keep, unless the tenant has its own
    # (`lowbit keys create --storage-quota-bytes`); 0 = no limit. Over it: 507 storage_quota_exceeded.
    tenant_storage_quota_bytes: int = 0
    # Finished jobs' files (the artifact, work files) are removed this many days after the job ended; the row,
    # its report and metadata stay, and the artifact answers 410 artifact_expired. 0 = keep them for ever.
    retention_days: float = 0
    # How often workers apply the retention (and remove stray temporary files): `lowbit gc` does it at once.
    gc_interval_s: float = 3600.0
    # Server-sent events (GET /api/v1/jobs/{id}/events): how often the stream reads the job row, and how
    # long it may stay quiet before it sends a keep-alive comment.
    events_poll_s: float = 0.25
    events_heartbeat_s: float = 15.0

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'lowbit.db').resolve()}"

    @property
    def keys_required(self) -> bool:
        return self.require_keys or not is_loopback(self.host)

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.resolved_broker_url.startswith("filesystem://")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
