"""Uploaded ML models."""
