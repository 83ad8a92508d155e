"""Test-session setup.

The Triton kernels are decorated at import time, and the decorator picks the interpreter only if
TRITON_INTERPRET=1 is already set: so it is set here, before anything imports triton. Tests then run the
Triton path on CPU tensors with ``FIREMPO_BACKEND=triton`` (see the ``backend`` fixture); the compile-only
tests, which need real JIT functions, run in a subprocess without the variable.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test once per backend; ``triton`` means the real kernels under the interpreter."""
    monkeypatch.setenv("FIREMPO_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Each test draws its own fresh random inputs, reproducibly."""
    torch.manual_seed(int.from_bytes(os.urandom(4), "little") if os.environ.get("FIREMPO_RANDOM_SEED") else 1234)
