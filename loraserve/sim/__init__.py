"""The simulator: the engine's own policies on a hardware cost model and a virtual clock."""
