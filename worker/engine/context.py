"""Types a run's parts share: the progress callback and the data a run calibrates and validates on.

Types only (no onnx, ONNX Runtime or torch at import), so the recipe handlers, the quantizer wrappers and the
pipeline can all name them without importing one another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: preflight imports the option tables, which import the recipes
    from worker.engine.hygiene import Overlap
    from worker.engine.npz import NpzReader
    from worker.engine.preflight import Split

# (stage, fraction in [0, 1]) -> None. May raise JobCancelled to stop the run.
ProgressFn = Callable[[str, float], None]


@dataclass
class RunData:
    """The run's data split and the readers of its calibration and evaluation samples."""

    split: Split
    calib_reader: NpzReader | None
    eval_reader: NpzReader | None
    # Evaluation samples that also calibrated (eval_set runs of calibrating recipes only).
    overlap: Overlap | None = None
