"""Alembic migrations for lowbit's tables (run with ``lowbit migrate``)."""
