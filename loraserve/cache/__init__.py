"""Cache policy: block pools and the managers that hand blocks to requests.

Pure Python over block counts; the tensors that hold the blocks belong to the
executor. Nothing here imports torch.
"""

from loraserve.cache.block_pool import BlockPool
from loraserve.cache.manager import CacheManager, SimpleCacheManager

__all__ = ["BlockPool", "CacheManager", "SimpleCacheManager"]
