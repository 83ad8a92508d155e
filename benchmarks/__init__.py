"""Benchmarks of firempo-kernels against every alternative a user could pick, on the same inputs.

    python benchmarks/report.py          # `make bench`: the CPU table, plots and RESULTS.md
    pytest benchmarks/                   # pytest-benchmark suite: forward, backward and both, per method
    bash benchmarks/gpu_check.sh         # on a CUDA machine: kernel correctness, then the GPU table

``workloads`` builds the inputs and every implementation, ``harness`` measures one case (in a fresh
process on the CPU), ``report`` runs the grid and writes ``benchmarks/report/``.
"""
