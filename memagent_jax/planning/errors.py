"""The planner's one error type."""

from __future__ import annotations

from memagent_jax.errors import UserError


class PlanError(UserError):
    """The planner cannot size this config (unknown hardware or preset, bad mesh); the message says what."""
