"""The workers' Celery application (``celery -A worker.celery_app worker``), configured by ``app.broker``,
which the API publishes through as well. The broker carries job ids only; the database row is the truth.
"""

from __future__ import annotations

import os

# `celery -A worker.celery_app` imports this first: ONNX Runtime's telemetry is off before anything imports it
# (else a worker writes $TMPDIR/.ses and ~/.cache/Microsoft/DeveloperTools/.onnxruntime/ outside its data).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from app.broker import make_celery  # noqa: E402
from app.settings import get_settings

# The modules whose tasks a worker runs (under app.broker's task names).
TASK_MODULES = ("worker.tasks", "worker.auto_tasks")

celery_app = make_celery(get_settings(), include=TASK_MODULES)
