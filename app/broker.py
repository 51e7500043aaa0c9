"""What the API (which publishes) and the workers (which consume) must agree on about the broker: the queue
names, the task names and the Celery configuration.

The API publishes by task name only (``send_task``), so it needs none of the worker's code; the worker's
Celery app (``worker.celery_app``) is built here too, with its task modules passed in. This keeps the import
direction one way: worker modules import app, app never imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from app.settings import Settings

if TYPE_CHECKING:  # the tables import the queue names; they need not load Celery for that
    from celery import Celery

# Queues, which a job's `device` names: 'cpu' workers run everywhere, 'gpu' workers on CUDA machines.
CPU_QUEUE = "cpu"
GPU_QUEUE = "gpu"
QUEUES = (CPU_QUEUE, GPU_QUEUE)

# Task names: the broker's messages carry these, the worker registers its functions under them.
TASK_RUN_JOB = "lowbit.run_job"
TASK_AUTO_CANDIDATE = "lowbit.auto_candidate"


def make_celery(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """A Celery app for ``settings``' broker. ``include``: the modules that define tasks (the worker's; a
    publisher needs none)."""
    from celery import Celery  # lazy: see the TYPE_CHECKING import above

    app = Celery("lowbit", broker=settings.resolved_broker_url, include=list(include))
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": settings.default_queue,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if settings.uses_filesystem_broker:
        folder = settings.broker_dir
        (folder / "queue").mkdir(parents=True, exist_ok=True)
        (folder / "processed").mkdir(parents=True, exist_ok=True)
        (folder / "control").mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            # Producer and consumer share one folder: messages are files there.
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Exchange tables; kombu's default is ./control, relative to wherever the process runs.
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
        # The filesystem transport has no broadcast: no remote control, mingle or gossip.
        conf["worker_enable_remote_control"] = False
    else:
        conf["broker_transport_options"] = {"visibility_timeout": 6 * 3600}
    app.conf.update(conf)
    return app
