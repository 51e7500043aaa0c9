"""Prometheus metrics, computed from the database on every scrape."""
