"""The floor under the fused ops: matrix-product FLOPs and the fewest bytes they must move.

    python benchmarks/gemm_floor.py [--tflops 798] [--tbps 3.0]

Counts, per shape, what ``fused_linear_token_kl`` (and ``fused_linear_logprobs``) must do in forward +
backward, and turns it into a time floor = max(FLOPs / bf16 GEMM rate, bytes / copy bandwidth). The
default rates are those of an H100 80GB HBM3 (8192^3 bf16 GEMM on random data: 798 TFLOP/s; device-to-device
copy: 3.0 TB/s counting read + write); pass the rates measured in the same run on the card at hand.
"""

import argparse
from dataclasses import dataclass

VOCAB = 151936
HIDDEN_SIZES = (2560, 3584)
TOKEN_COUNTS = (64, 512, 8192)
BF16 = 2


@dataclass(frozen=True)
class OpCost:
    flops: float
    bytes: float

    def floor_ms(self, tflops: float, tbps: float) -> float:
        return 1e3 * max(self.flops / (tflops * 1e12), self.bytes / (tbps * 1e12))

    def bound(self, tflops: float, tbps: float) -> str:
        return "matrix" if self.flops / (tflops * 1e12) >= self.bytes / (tbps * 1e12) else "memory"


def token_kl_cost(n: int, vocab: int, d: int, *, head_trains: bool, with_ref: bool = True) -> OpCost:
    """Forward: policy (and reference) logit tiles. Backward: the same tiles rebuilt, dS @ W for dh, and
    dS^T @ h for dW only when the head trains. Each product is 2 * n * vocab * d FLOPs.

    Bytes: every operand read once per pass (hidden states and heads, bf16), dh written, dW written (bf16)
    when the head trains; per-token statistics are O(n) and negligible.
    """
    models = 2 if with_ref else 1
    products = models + models + 1 + (1 if head_trains else 0)
    flops = 2.0 * n * vocab * d * products
    operands = models * (n * d + vocab * d) * BF16
    written = n * d * BF16 + (vocab * d * BF16 if head_trains else 0)
    return OpCost(flops, 2 * operands + written)


def table(tflops: float, tbps: float) -> str:
    rows = [
        "| op | N | d | head | GFLOP | GB moved | floor ms | bound by |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for op, with_ref in (("token_kl", True), ("logprobs", False)):
        for d in HIDDEN_SIZES:
            for n in TOKEN_COUNTS:
                for trains in (True, False):
                    c = token_kl_cost(n, VOCAB, d, head_trains=trains, with_ref=with_ref)
                    rows.append(
                        f"| {op} | {n} | {d} | {'trains' if trains else 'frozen'} | {c.flops / 1e9:.0f} | "
                        f"{c.bytes / 1e9:.2f} | {c.floor_ms(tflops, tbps):.2f} | {c.bound(tflops, tbps)} |"
                    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--tflops", type=float, default=798.0, help="bf16 GEMM rate, TFLOP/s")
    parser.add_argument("--tbps", type=float, default=3.0, help="copy bandwidth, TB/s (read + write)")
    args = parser.parse_args()
    print(f"V = {VOCAB}; floor = max(FLOPs / {args.tflops} TFLOP/s, bytes / {args.tbps} TB/s)\n")
    print(table(args.tflops, args.tbps))


if __name__ == "__main__":
    main()
