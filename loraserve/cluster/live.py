"""The request routers living in this process, by "app/deployment".

The endpoint reads the live replica set and the routing counters from its
router. A module of its own, looked up when a router starts: Serve ships the
router class to the handle pickled by value, with copies of its module's
globals, so a registry kept beside the class would not be the one the endpoint reads.
"""

from __future__ import annotations

ROUTERS: dict[str, object] = {}
