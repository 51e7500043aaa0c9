"""The quantization engine.

Explicit paths and frozen config objects in, result objects out. No web framework, task queue or
database here: the same code runs from the ``lowbit quantize`` CLI, a plain script and the worker.
Heavy modules (onnxruntime, torch) are imported inside the functions that need them so that the
API process can use the light parts (model and dataset inspection) without loading them.
"""

from worker.engine.errors import EngineError

__all__ = ["EngineError"]
