"""SLO-driven provisioning of the LoRA server: cache capacity and GPU count
from adapter popularity, sizes, load times, the request rate and the SLO.
A reconstruction of InfiniLoRA's planner (README: "Provisioning").

    from loraserve.plan import PlanInput, provision
    plan = provision(PlanInput("mixtral-8x7b", adapters=512, zipf=1.2, rate=20))
    plan.cache_bytes, plan.cache_adapters, plan.server_gpus, plan.iar, plan.resident
"""

from loraserve.plan.provision import CACHE_MODELS, Plan, PlanInput, provision

__all__ = ["CACHE_MODELS", "Plan", "PlanInput", "provision"]
