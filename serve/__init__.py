"""Serve: see README.md."""
