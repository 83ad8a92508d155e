"""Sequence-level DPO (the dpo preset): B pairs of T-token rows, every token counted, every method."""

import pytest

from benchmarks.workloads import METHODS, MODES, Case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("head", ["trainable", "frozen"])
@pytest.mark.parametrize("method", METHODS["dpo"])
def bench_dpo(run_case, sizes, device, method, head, mode):
    _, loss_shape, dtype = sizes
    b, t = loss_shape["batch"], loss_shape["seq"]
    run_case(Case("dpo", method, loss_shape["vocab"], loss_shape["dim"], dtype=dtype, head=head, device=device,
                  batch=b, seq=t, response=t, spans=t, regime="dense"), mode)
