"""Cache policy: block pools, the dependency tree, the cost model and the
managers that hand blocks to requests.

Pure Python over block counts, sizes and times; the tensors that hold the
blocks belong to the executor. Nothing here imports torch.
"""

from loraserve.cache.block_pool import BlockPool
from loraserve.cache.manager import CacheManager, Readiness
from loraserve.cache.mover import CopyJob, LinkMover, Mover
from loraserve.cache.policy import POLICIES, CachePolicy
from loraserve.cache.tiered import TieredCacheManager

__all__ = ["BlockPool", "CacheManager", "CachePolicy", "CopyJob", "LinkMover", "Mover", "POLICIES", "Readiness",
           "TieredCacheManager"]
