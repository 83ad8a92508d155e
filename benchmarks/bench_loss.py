"""One FiRe-MPO loss step (4 policy + 4 reference blocks), every method, both regimes, head frozen."""

import pytest

from benchmarks.workloads import METHODS, MODES, REGIMES, Case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("regime", sorted(REGIMES))
@pytest.mark.parametrize("method", METHODS["loss"])
def bench_loss(run_case, sizes, device, method, regime, mode):
    _, loss_shape, dtype = sizes
    run_case(Case("loss", method, dtype=dtype, device=device, regime=regime,
                  **loss_shape, **REGIMES[regime](loss_shape["seq"])), mode)
