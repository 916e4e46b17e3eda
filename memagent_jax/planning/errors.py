"""The planner's one error type."""

from __future__ import annotations


class PlanError(ValueError):
    """The planner cannot size this config (unknown hardware or preset, bad mesh); the message says what."""
