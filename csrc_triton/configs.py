"""Launch configurations, in one place so the compile-only tests can check every one of them.

Shared memory per pipelined stage of a logits tile is (BLOCK_N + BLOCK_V) * BLOCK_D * itemsize; a kernel
with a reference side holds two such pipelines. With BLOCK_N=64, BLOCK_V=128 and 3 stages that is
2 * 3 * 192 * BLOCK_D * itemsize: 147 KB for bf16 at BLOCK_D=64 and the same for fp32 at BLOCK_D=32,
under both the sm_80 (166912 B) and sm_90 (232448 B) limits. The compile-only tests hold us to that.
"""

from dataclasses import dataclass

import torch

from .logits_tile import INTERPRETED


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The interpreter costs ~1.5 ms per tile step whatever the tile size, and has no warps or stages.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)

# Fewer tokens than this fill at most one row block; below it the block shrinks (tl.dot needs >= 16).
_FULL_BLOCK_N = 64


def tile_config(num_tokens: int, dtype: torch.dtype) -> TileConfig:
    """Tile shape for ``num_tokens`` rows of ``dtype`` operands (forward and dlogits kernels alike)."""
    if INTERPRETED:
        return INTERPRETER_CONFIG
    block_n = _FULL_BLOCK_N
    while block_n > 16 and block_n // 2 >= num_tokens:
        block_n //= 2
    block_d = 32 if dtype == torch.float32 else 64
    return TileConfig(block_n=block_n, block_v=128, block_d=block_d, num_warps=8, num_stages=3)


def all_gpu_configs() -> list[tuple[TileConfig, torch.dtype]]:
    """Every (config, dtype) pair ``tile_config`` can return on a GPU, for the compile-only tests."""
    seen = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        block_n = _FULL_BLOCK_N
        while block_n >= 16:
            block_d = 32 if dtype == torch.float32 else 64
            seen.append((TileConfig(block_n, 128, block_d, 8, 3), dtype))
            block_n //= 2
    return seen


def vocab_splits(num_row_blocks: int, num_vocab_tiles: int, device: torch.device) -> int:
    """How many programs share one row block's vocabulary (flash-decoding style).

    Few tokens leave most of the chip idle with one program per row block; splitting the vocabulary
    until there are ~2 programs per SM keeps every SM streaming its own slice of the head.
    """
    if INTERPRETED or device.type != "cuda":
        return min(3, num_vocab_tiles)  # small, but > 1 so the merge is exercised under test
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-2 * sms // num_row_blocks)
    return max(1, min(wanted, num_vocab_tiles))
