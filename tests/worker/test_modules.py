"""How the worker's modules depend on each other: the Celery task modules share helpers through
worker/runner.py, worker/sweeper.py and app/jobs/lifecycle.py, never through each other's private names, and
worker.tasks (which imports worker.auto_tasks to hand it auto jobs) is imported by none of those."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("worker.auto_tasks", "worker.runner", "worker.sweeper", "app.jobs.lifecycle")


def _imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in ``module``, inside functions too."""
    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [a.name for a in node.names]
            found.append((node.module, names))
            found.extend((f"{node.module}.{n}", []) for n in names)  # `from worker import tasks`
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_do_not_import_the_job_task(module: str) -> None:
    assert [m for m, _ in _imports(module) if m == "worker.tasks"] == []


def test_auto_tasks_takes_no_private_name_of_another_module() -> None:
    private = [(m, n) for m, names in _imports("worker.auto_tasks") for n in names if n.startswith("_")]
    assert private == []
