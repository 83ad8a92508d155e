"""Test-session setup.

The Triton kernels are decorated at import time, and the decorator picks the interpreter only if
TRITON_INTERPRET=1 is already set: so it is set here, before anything imports triton. Tests then run the
Triton path on CPU tensors with ``FIREMPO_BACKEND=triton`` (see the ``backend`` fixture); the compile-only
tests, which need real JIT functions, run in a subprocess without the variable.

Random inputs are fresh in every session: each test is seeded from a session seed and its own name, and the
session seed is printed in the header (and after the failures). ``FIREMPO_TEST_SEED=<int>`` replays a session.
"""

import os
import zlib

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

SESSION_SEED = int(os.environ.get("FIREMPO_TEST_SEED", int.from_bytes(os.urandom(3), "little")))


def pytest_report_header(config):
    return f"FIREMPO_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """``-q`` hides the header: a failing session names its seed again at the end, so it can be replayed."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"replay with FIREMPO_TEST_SEED={SESSION_SEED}")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test once per backend; ``triton`` means the real kernels under the interpreter."""
    monkeypatch.setenv("FIREMPO_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SESSION_SEED + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is as fast, and a second one spins against the other processes of a
    busy 2-core runner (10x slower measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
