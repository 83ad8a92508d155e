"""Triton kernels (layer 1): ``@triton.jit`` functions and their launch helpers, nothing else.

Importing this package imports Triton. The ops layer imports it lazily, so the package works without
Triton on machines that only use the chunked PyTorch path.
"""

from .token_dlogits_bwd import token_dlogits
from .token_stats_fwd import NUM_STATS, token_stats_partials

__all__ = ["NUM_STATS", "token_dlogits", "token_stats_partials"]
