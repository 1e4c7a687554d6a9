"""Step caching: skip the later transformer blocks on steps where little changes (docs/step-caching.md).

`pipe(..., cache="fbcache:0.1")` or `cache="taylor:1"`; on its own, `attach_cache(transformer,
parse_cache(spec), steps=N)` hooks a transformer and `.remove()` restores it. The model's code is not
touched: the cache is a swapped block list plus forward hooks (`hook.py`) with its own state
(`state.py`).
"""

from .hook import CachedBlocks, StepCache, attach_cache
from .spec import CacheSpec, parse_cache
from .state import CacheState

__all__ = ["CacheSpec", "CacheState", "CachedBlocks", "StepCache", "attach_cache", "parse_cache"]
