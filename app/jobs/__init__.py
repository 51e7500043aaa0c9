"""Quantization jobs: submission, life cycle, artifacts and reports."""
