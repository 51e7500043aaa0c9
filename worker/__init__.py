"""lowbit worker: the Celery tasks (``worker.tasks``) and the quantization engine (``worker.engine``).

Kept empty on purpose: importing ``worker.engine`` must not pull in Celery or the database.
"""
