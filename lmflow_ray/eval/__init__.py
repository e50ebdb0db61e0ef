"""Evaluation: metrics as pure functions (metrics.py)."""
