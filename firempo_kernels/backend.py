"""Which implementation runs an op: ``FIREMPO_BACKEND`` = auto | triton | torch.

auto picks the Triton kernels for CUDA tensors and the chunked PyTorch path everywhere else. Forcing
``triton`` on CPU tensors is allowed only under ``TRITON_INTERPRET=1`` (the Triton interpreter), which is
how the kernels are tested without a GPU.
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def requested_backend() -> str:
    """The value of ``FIREMPO_BACKEND`` (default ``auto``), validated."""
    name = os.environ.get("FIREMPO_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FIREMPO_BACKEND must be one of {BACKENDS}; got {name!r}")
    return name


def resolve_backend(device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` of ``dtype``; raises when forced and impossible."""
    name = requested_backend()
    if name == "auto":
        return "triton" if device.type == "cuda" and dtype in _TRITON_DTYPES else "torch"
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not (device.type == "cpu" and interpreted):
            raise ValueError(
                f"FIREMPO_BACKEND=triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
                f"got tensors on {device}"
            )
        if dtype not in _TRITON_DTYPES:
            raise TypeError(
                f"FIREMPO_BACKEND=triton supports float32, bfloat16 and float16; got {dtype} "
                "(float64 runs on FIREMPO_BACKEND=torch)"
            )
    return name
