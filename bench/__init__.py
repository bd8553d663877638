"""Bench: see README.md."""
