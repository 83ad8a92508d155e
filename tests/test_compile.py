"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80) in every launch configuration it can
get (with and without a reference, with and without a logit soft cap), within the shared-memory limit, with
no register spills, and on the tensor cores for 16-bit operands.

Compiling needs real JIT functions, so it runs in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest

from firempo_kernels.kernel_report import SHARED_LIMIT


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "firempo_kernels.kernel_report", "--json"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.stderr == "" or out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_every_configuration_was_compiled(reports):
    from firempo_kernels.csrc_triton.configs import GPU_ARCHES, KERNELS

    seen = {(r["kernel"], r["arch"], r["dtype"], r["has_ref"], r["softcap"]) for r in reports}
    assert seen == {(k, a, d, ref, cap) for k in KERNELS for a in GPU_ARCHES for d in ("fp32", "bf16", "fp16")
                    for ref in (True, False) for cap in (True, False)}


def test_within_shared_memory_and_no_spills(reports):
    for r in reports:
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], r
        assert r["spill_bytes"] == 0 and r["stack_bytes"] == 0, r


def test_sixteen_bit_dots_use_tensor_cores(reports):
    for r in reports:
        if r["dtype"] != "fp32":
            assert r["tensor_core_ops"] > 0, r
