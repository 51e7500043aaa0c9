"""Uploaded calibration and evaluation datasets (.npz)."""
