"""The Celery application, shared by the API (to enqueue) and the workers (to consume).

The broker carries job ids only; the database row is the truth.
"""

from __future__ import annotations

from celery import Celery

from app.settings import Settings, get_settings

TASK_RUN_JOB = "lowbit.run_job"


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("lowbit", broker=s.resolved_broker_url, include=["worker.tasks", "worker.auto_tasks"])
    conf: dict[str, object] = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": s.default_queue,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "task_serializer": "json",
        "accept_content": ["json"],
    }
    if s.uses_filesystem_broker:
        folder = s.broker_dir
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


celery_app = make_celery()
