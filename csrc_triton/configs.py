"""Launch configurations, in one place so the compile-only tests can check every one of them.

Each kernel has one tile shape per operand class (fp32 vs 16-bit) and row bucket (<= 16, <= 32, more
tokens; ``tl.dot`` needs at least 16 rows). They were chosen from ptxas reports for sm_90 (see
benchmarks/TUNING.md) as the largest tiles that compile with no register spills: the forward keeps policy
and reference tiles, their exponentials and s - t live at once, so it takes narrower tiles than the
dlogits kernel. Shared memory is far below the sm_80 (166912 B) and sm_90 (232448 B) limits for all of
them; the compile-only tests hold every entry to both limits and to zero spills.
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


KERNELS = ("token_stats_fwd", "token_dlogits_bwd")
ROW_BUCKETS = (16, 32, 64)

# kernel -> operands are fp32 -> row bucket -> config
_TABLE = {
    "token_stats_fwd": {
        False: {16: TileConfig(16, 64, 64, 8, 3), 32: TileConfig(32, 64, 64, 8, 3), 64: TileConfig(64, 128, 32, 8, 3)},
        True: {16: TileConfig(16, 64, 32, 8, 3), 32: TileConfig(32, 64, 16, 8, 3), 64: TileConfig(32, 64, 16, 8, 3)},
    },
    "token_dlogits_bwd": {
        False: {16: TileConfig(16, 128, 64, 8, 3), 32: TileConfig(32, 128, 64, 8, 3), 64: TileConfig(64, 128, 64, 8, 3)},
        True: {16: TileConfig(16, 64, 64, 8, 3), 32: TileConfig(32, 64, 64, 8, 3), 64: TileConfig(64, 64, 64, 8, 3)},
    },
}

# Ampere has no warpgroup MMA; its mma.sync accumulators cost more registers, so the 64-row tiles that
# spill there are narrowed (ptxas on sm_80: 112, 164 and 32 spill bytes before, 0 after).
_SM80_OVERRIDES = {
    ("token_stats_fwd", False, 64): TileConfig(64, 64, 32, 8, 3),
    ("token_dlogits_bwd", False, 64): TileConfig(64, 128, 32, 8, 3),
    ("token_dlogits_bwd", True, 64): TileConfig(64, 64, 32, 8, 3),
}
# A logit soft cap adds the tanh's temporaries to the tiles. Where that spills, the capped launch gets its own
# configuration and the uncapped one keeps its own. ptxas, fp32 64-row dlogits with a reference on sm_90:
# 68 spill bytes at 64x64x64 with 3 stages, 0 with 2 (64x64x32, sm_80's tile, spilled 8 bytes there without
# a reference). sm_80's own 64x64x32 tile needs no change.
_SM90_SOFTCAP_OVERRIDES = {
    ("token_dlogits_bwd", True, 64): TileConfig(64, 64, 64, 8, 2),
}
GPU_ARCHES = (90, 80)

# The interpreter costs ~1.5 ms per tile step whatever the tile size, and has no warps or stages.
INTERPRETER_CONFIG = TileConfig(block_n=16, block_v=64, block_d=32, num_warps=1, num_stages=1)


def _lookup(kernel: str, fp32: bool, bucket: int, arch: int, softcap: bool = False) -> TileConfig:
    if softcap and arch >= 90 and (kernel, fp32, bucket) in _SM90_SOFTCAP_OVERRIDES:
        return _SM90_SOFTCAP_OVERRIDES[kernel, fp32, bucket]
    if arch < 90 and (kernel, fp32, bucket) in _SM80_OVERRIDES:
        return _SM80_OVERRIDES[kernel, fp32, bucket]
    return _TABLE[kernel][fp32][bucket]


def tile_config(kernel: str, num_tokens: int, dtype: torch.dtype, device: torch.device,
                softcap: bool = False) -> TileConfig:
    """Tile shape for ``kernel`` over ``num_tokens`` rows of ``dtype`` operands on ``device``; ``softcap``:
    for the launch with soft-capped logits."""
    if INTERPRETED or device.type != "cuda":
        return INTERPRETER_CONFIG
    major, minor = torch.cuda.get_device_capability(device)
    bucket = next((b for b in ROW_BUCKETS if num_tokens <= b), ROW_BUCKETS[-1])
    return _lookup(kernel, dtype == torch.float32, bucket, 10 * major + minor, softcap)


def all_gpu_configs(arch: int) -> list[tuple[str, TileConfig, torch.dtype, bool]]:
    """Every (kernel, config, dtype, softcap) ``tile_config`` can return on sm_``arch``, for the compile-only
    tests."""
    return [
        (kernel, _lookup(kernel, dtype == torch.float32, bucket, arch, softcap), dtype, softcap)
        for kernel in KERNELS
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
        for bucket in ROW_BUCKETS
        for softcap in (False, True)
    ]


def vocab_splits(num_row_blocks: int, num_vocab_tiles: int, device: torch.device) -> int:
    """How many programs share one row block's vocabulary (flash-decoding style).

    Few tokens leave most of the chip idle with one program per row block; splitting the vocabulary
    until there is a program per SM keeps every SM streaming its own slice of the head.
    """
    if INTERPRETED or device.type != "cuda":
        return min(3, num_vocab_tiles)  # small, but > 1 so the merge is exercised under test
    # The 64-row configurations take ~255 registers x 256 threads: one program per SM. One wave of
    # programs, each streaming an equal slice, beats 1.x waves of thinner slices.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = -(-sms // max(1, num_row_blocks))
    return max(1, min(wanted, num_vocab_tiles))
