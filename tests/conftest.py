"""Test-session setup.

The Triton kernels are decorated at import time, and the decorator picks the interpreter only if
TRITON_INTERPRET=1 is already set; csrc_triton reads the same variable at import for its launch choices
(fp32 operands for the interpreter's dots, tile shapes, vocabulary splits). So one process runs either the
interpreter or the compiled kernels, and this file chooses before anything imports triton: where there is
no CUDA device, the interpreter, and tests run the Triton path on CPU tensors with
``FIREMPO_BACKEND=triton`` (the ``backend`` fixture); where there is one, the compiled kernels, which
tests/test_cuda_kernels.py checks at real shapes, while the interpreter's CPU cases skip. That keeps each
kernel on one path that the users' runs share, rather than a second launch path kept only for the tests.
``TRITON_INTERPRET=1`` set by hand on a CUDA machine runs the suite as on a machine without one. The
compile-only tests, which need real JIT functions, run in a subprocess without the variable.

Random inputs are fresh in every session: each test is seeded from a session seed and its own name, and the
session seed is printed in the header (and after the failures). ``FIREMPO_TEST_SEED=<int>`` replays a session.
"""

import os
import zlib

import pytest
import torch  # does not import triton

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
NO_INTERPRETER = ("the Triton interpreter, which runs the kernels on CPU tensors, is off where CUDA is "
                  "(tests/test_cuda_kernels.py runs the compiled kernels there; TRITON_INTERPRET=1 turns it on)")

SESSION_SEED = int(os.environ.get("FIREMPO_TEST_SEED", int.from_bytes(os.urandom(3), "little")))


def pytest_report_header(config):
    return f"FIREMPO_TEST_SEED={SESSION_SEED}; Triton kernels {'interpreted' if INTERPRETED else 'compiled'}"


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels on CPU tensors (skipped where the "
                                       "interpreter is off)")
    config.addinivalue_line("markers", "slow: multi-rank launches, tens of seconds each; CI runs them too "
                                       "(-m 'not slow' leaves them out of a quick local run)")


def pytest_runtest_setup(item):
    if not INTERPRETED and item.get_closest_marker("interpreter"):
        pytest.skip(NO_INTERPRETER)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """``-q`` hides the header: a failing session names its seed again at the end, so it can be replayed."""
    if terminalreporter.stats.get("failed") or terminalreporter.stats.get("error"):
        terminalreporter.write_line(f"replay with FIREMPO_TEST_SEED={SESSION_SEED}")


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Runs a test once per backend; ``triton`` means the real kernels under the interpreter."""
    if request.param == "triton" and not INTERPRETED:
        pytest.skip(NO_INTERPRETER)
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
