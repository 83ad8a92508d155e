"""firempo-kernels: fused kernels for FiRe-MPO preference optimisation of vision-language models.

Everything is computed from hidden states; ``tokens x vocab`` logits are never materialised.
"""

from .ops import TokenKL, fused_linear_logprobs, fused_linear_token_kl

__all__ = ["TokenKL", "fused_linear_logprobs", "fused_linear_token_kl"]
__version__ = "0.1.0"
