"""Which chunk shape the CPU path should use: its matrix products at each shape of one element budget, then
the fused ops under each token chunk, interleaved with naive; and what compiling the chunk step would save.

    .venv/bin/python benchmarks/chunk_shapes.py [--rounds 5] [--ops] [--compile]
    (1-2 minutes; 6 more with --ops, 1 more with --compile)

Products: every chunk of an N x V sweep (N = 1024, V = 32000, d = 512) for the three products of the torch
path: the logits h_i w_j^T, dS_ij w_j (dh and, frozen, E_p[w]) and dS_ij^T h_i (dW), each shape the same
2**18 elements. Ops (``--ops``): the suite's log-prob, token-KL and DPO steps with the fused path at each
token chunk (``ops._TORCH_TOKEN_CHUNK``; the vocabulary chunk follows from the budget) and naive, alternating
round by round in this process. Compile (``--compile``): one chunk's statistics (everything of the forward
but its product) eager and under ``torch.compile``, beside the chunk's logits product. Medians;
benchmarks/TUNING.md section 4 records what they showed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import Case, grad_leaves, make_inputs, make_step  # noqa: E402
from firempo_kernels import ops  # noqa: E402
from firempo_kernels.token_stats import chunk_stats  # noqa: E402

SHAPES = ((128, 2048), (256, 1024), (512, 512), (1024, 256))
PRODUCTS = ("logits h w^T", "dS w", "dS^T h")


def product_sweep(kind: str, h: torch.Tensor, w: torch.Tensor, ds: torch.Tensor, shape: tuple[int, int]) -> None:
    """One pass of ``kind`` over every (token, vocabulary) chunk of ``shape``."""
    n_tokens, vocab = h.shape[0], w.shape[0]
    n_chunk, v_chunk = shape
    dw = torch.empty_like(w)
    for i in range(0, n_tokens, n_chunk):
        for j in range(0, vocab, v_chunk):
            rows, cols = slice(i, i + n_chunk), slice(j, j + v_chunk)
            width = min(v_chunk, vocab - j)
            if kind == PRODUCTS[0]:
                h[rows] @ w[cols].T
            elif kind == PRODUCTS[1]:
                ds[rows, :width] @ w[cols]
            else:
                torch.mm(ds[rows, :width].T, h[rows], out=dw[cols])


def time_products(tokens: int, vocab: int, dim: int, rounds: int) -> dict[tuple[str, tuple[int, int]], float]:
    """Median seconds of each (product, shape) sweep; shapes alternate within each round."""
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(tokens, dim, generator=gen), torch.randn(vocab, dim, generator=gen)
    ds = torch.randn(max(s[0] for s in SHAPES), max(s[1] for s in SHAPES), generator=gen)
    times = {(kind, shape): [] for kind in PRODUCTS for shape in SHAPES}
    for r in range(rounds + 1):  # round 0 warms up
        for kind, shape in times:
            t0 = time.perf_counter()
            product_sweep(kind, h, w, ds, shape)
            if r:
                times[(kind, shape)].append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in times.items()}


def op_cases() -> dict[str, dict]:
    common = {"vocab": 32000, "dim": 512}
    return {
        "logprobs N=512, frozen": dict(common, workload="logprobs", tokens=512),
        "logprobs N=512, trainable": dict(common, workload="logprobs", tokens=512, head="trainable"),
        "token_kl N=512, frozen": dict(common, workload="token_kl", tokens=512),
        "token_kl N=512, trainable": dict(common, workload="token_kl", tokens=512, head="trainable"),
        "dpo B=1 T=256, frozen": dict(common, workload="dpo", batch=1, seq=256),
        "dpo B=1 T=256, trainable": dict(common, workload="dpo", batch=1, seq=256, head="trainable"),
    }


def time_ops(token_chunks: list[int], rounds: int, cases: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Per case: median forward + backward seconds of naive and of fused at each token chunk."""
    out = {}
    default = dict(ops._TORCH_TOKEN_CHUNK)
    try:
        for name, fields in cases.items():
            inputs = make_inputs(Case(method="fused", **fields))
            fused, naive = (make_step(Case(method=m, **fields), inputs) for m in ("fused", "naive"))
            times = {"naive": []} | {f"fused {n}": [] for n in token_chunks}
            for r in range(rounds + 1):
                for label in times:
                    if label != "naive":
                        ops._TORCH_TOKEN_CHUNK = dict(default, cpu=int(label.split()[1]))
                    for leaf in grad_leaves(inputs):
                        leaf.grad = None
                    t0 = time.perf_counter()
                    (naive if label == "naive" else fused)().backward()
                    if r:
                        times[label].append(time.perf_counter() - t0)
            out[name] = {label: statistics.median(v) for label, v in times.items()}
    finally:
        ops._TORCH_TOKEN_CHUNK = default
    return out


def _median_s(fn, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_chunk_step(n_chunk: int, v_chunk: int, dim: int, rounds: int) -> dict[str, float]:
    """Median seconds, for one n_chunk x v_chunk chunk: its logits product, and its statistics with and
    without a reference, eager and compiled (the logits given, so only the elementwise work is timed)."""
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(n_chunk, dim, generator=gen), torch.randn(v_chunk, dim, generator=gen) / dim**0.5
    s, t = h @ w.T, (h + 0.3 * torch.randn(h.shape, generator=gen)) @ w.T
    y = torch.randint(0, v_chunk, (n_chunk,), generator=gen)

    def stats(s, t, y):  # chunk_stats consumes its logits: time it on copies (a copy costs ~1% of it)
        return chunk_stats(s.clone(), None if t is None else t.clone(), y)

    compiled = torch.compile(stats, dynamic=False)
    out = {"logits product": _median_s(lambda: h @ w.T, rounds)}
    for label, ref in (("without reference", None), ("with reference", t)):
        out[f"statistics {label}, eager"] = _median_s(lambda: stats(s, ref, y), rounds)
        out[f"statistics {label}, compiled"] = _median_s(lambda: compiled(s, ref, y), rounds)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", action="store_true", help="also time the fused ops under each token chunk")
    parser.add_argument("--compile", action="store_true", help="also time one chunk's statistics compiled")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    tokens, vocab, dim = 1024, 32000, 512
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {tokens}, V = {vocab}, d = {dim}, "
          f"medians of {args.rounds}\n")
    times = time_products(tokens, vocab, dim, args.rounds)
    print("| product (ms per sweep) | " + " | ".join(f"{n} x {v}" for n, v in SHAPES) + " |")
    print("|---|" + "---:|" * len(SHAPES))
    for kind in PRODUCTS:
        print(f"| {kind} | " + " | ".join(f"{times[(kind, s)] * 1e3:.0f}" for s in SHAPES) + " |")
    if args.ops:
        chunks = [n for n, _ in SHAPES[:3]]
        print("\n| step (ms, ratio to naive) | naive | " + " | ".join(f"fused, {n}-token chunks" for n in chunks) + " |")
        print("|---|---:|" + "---:|" * len(chunks))
        for name, row in time_ops(chunks, args.rounds, op_cases()).items():
            base = row["naive"]
            cells = " | ".join(f"{row[f'fused {n}'] * 1e3:.0f} ({row[f'fused {n}'] / base:.2f}x)" for n in chunks)
            print(f"| {name} | {base * 1e3:.0f} | {cells} |")
    if args.compile:
        n_chunk, v_chunk = ops.chunk_shape(1 << 20, 1 << 20, torch.device("cpu"))
        print(f"\n| one {n_chunk} x {v_chunk} chunk | ms |\n|---|---:|")
        for label, seconds in time_chunk_step(n_chunk, v_chunk, dim, 10 * args.rounds).items():
            print(f"| {label} | {seconds * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
