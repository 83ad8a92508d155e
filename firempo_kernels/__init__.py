"""firempo-kernels: fused kernels for FiRe-MPO preference optimisation of vision-language models.

Everything is computed from hidden states; ``tokens x vocab`` logits are never materialised.
"""

from .losses import LOSS_PRESETS, FiReMPOLoss, FiReMPOOutput, firempo_loss
from .ops import TokenKL, fused_linear_logprobs, fused_linear_token_kl
from .precomputed_reference import PrecomputedReference

__all__ = [
    "TokenKL", "fused_linear_logprobs", "fused_linear_token_kl",
    "FiReMPOLoss", "FiReMPOOutput", "LOSS_PRESETS", "PrecomputedReference", "firempo_loss",
]
__version__ = "0.1.0"
