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


def resolve_backend(device: torch.device, *dtypes: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for operands on ``device`` of ``dtypes`` (policy, then reference).

    The kernels take one operand dtype for both models (their launch table is per dtype), so ``auto`` keeps
    mixed-dtype calls on the torch path, and a forced ``triton`` refuses them.
    """
    name = requested_backend()
    kernel_dtypes = all(dt in _TRITON_DTYPES for dt in dtypes) and len(set(dtypes)) == 1
    if name == "auto":
        return "triton" if device.type == "cuda" and kernel_dtypes else "torch"
    if name == "triton":
        interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if device.type != "cuda" and not (device.type == "cpu" and interpreted):
            raise ValueError(
                f"FIREMPO_BACKEND=triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; "
                f"got tensors on {device}"
            )
        if not kernel_dtypes:
            raise TypeError(
                "FIREMPO_BACKEND=triton needs float32, bfloat16 or float16 operands, one dtype for the policy "
                f"and the reference; got {', '.join(map(str, dtypes))} (other dtypes run on FIREMPO_BACKEND=torch)"
            )
    return name
