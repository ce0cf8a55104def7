"""The families' import of the public `job` decorator (fleet.shared.registry), kept for older imports."""

from fleet.shared.registry import job

__all__ = ["job"]
