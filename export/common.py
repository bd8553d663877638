"""Compatibility: `from export.common import job_for` still works while callers move to export.job."""
from export.job import job_for

__all__ = ["job_for"]
