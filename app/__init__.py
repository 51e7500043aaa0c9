"""lowbit API service. Must not import torch or onnxruntime at import time (a test checks)."""
