"""Export: see README.md."""
