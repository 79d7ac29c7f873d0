"""Routing requests to base-model instances (pure policy; `policy.py`)."""

from loraserve.router.policy import POLICIES, REASONS, Bound, Choice, InstanceLoad, Router

__all__ = ["POLICIES", "REASONS", "Bound", "Choice", "InstanceLoad", "Router"]
