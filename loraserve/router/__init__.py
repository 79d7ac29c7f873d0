"""Routing requests to base-model instances (pure policy; `policy.py`)."""

from loraserve.router.policy import ROUTERS, InstanceLoad, route

__all__ = ["ROUTERS", "InstanceLoad", "route"]
