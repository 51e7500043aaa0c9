"""What a quantization run returns (pipeline.run, and a model with external data's stream_pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QuantizeResult:
    artifact_path: Path
    artifact_sha256: str
    artifact_bytes: int
    report: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


