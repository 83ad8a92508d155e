"""The core ops, every method, head trainable and frozen, forward / backward / both."""

import pytest

from benchmarks.workloads import METHODS, MODES, Case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", ("trainable", "frozen"))
@pytest.mark.parametrize("workload,method", [(w, m) for w in ("logprobs", "token_kl") for m in METHODS[w]])
def bench_op(run_case, sizes, device, workload, method, head, mode):
    op_shape, _, dtype = sizes
    run_case(Case(workload, method, dtype=dtype, head=head, device=device, **op_shape), mode)
