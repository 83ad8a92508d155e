"""Compile every Triton kernel for a GPU target without a GPU, and report its resources.

    python -m firempo_kernels.kernel_report [--arch 90 80] [--json]

For each kernel, launch configuration and operand dtype, with and without the reference and with and
without a logit soft cap (``SOFTCAP``; without it the kernels compile as if the cap did not exist), this
prints the shared memory Triton allocates, and the registers, stack frame and spill bytes ptxas reports,
and whether the tensor-core instructions expected for the target (``wgmma`` on sm_90, ``mma.sync`` on
sm_80) are in the PTX. Must run without TRITON_INTERPRET=1 (the interpreter replaces the JIT functions that
``triton.compile`` needs).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block, opt-in maximum
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class KernelResources:
    kernel: str
    arch: int
    dtype: str
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    has_ref: bool
    softcap: bool
    shared_bytes: int
    registers: int
    stack_bytes: int
    spill_bytes: int
    tensor_core_ops: int

    @property
    def within_limits(self) -> bool:
        return self.shared_bytes <= SHARED_LIMIT[self.arch] and self.spill_bytes == 0


def _signature(kernel, dtype: str) -> dict[str, str]:
    operands = {"h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr"}
    sig = {}
    for param, name in zip(kernel.params, kernel.arg_names):
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name == "y_ptr":
            sig[name] = "*i64"
        elif name == "ds_ptr":
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype if name in operands else "*fp32"
        elif name in ("inv_tau", "softcap"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_report(ptx: str, arch: int) -> tuple[int, int, int]:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name", gpu, src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    registers = int(re.search(r"Used (\d+) registers", text).group(1))
    stack = int(re.search(r"(\d+) bytes stack frame", text).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", text).group(1))
    return registers, stack, spills


def compile_one(kernel_name: str, cfg, dtype: torch.dtype, arch: int, has_ref: bool,
                softcap: bool = False) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from firempo_kernels.csrc_triton import token_dlogits_bwd, token_stats_fwd
    from firempo_kernels.csrc_triton.logits_tile import dot_precision

    kernel = {
        "token_stats_fwd": token_stats_fwd._token_stats_fwd_kernel,
        "token_dlogits_bwd": token_dlogits_bwd._token_dlogits_kernel,
    }[kernel_name]
    constexprs = dict(
        HAS_BIAS=True, HAS_REF=has_ref, HAS_REF_BIAS=has_ref,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d, UPCAST_DOT=False,
        PRECISION=dot_precision(dtype), REF_PRECISION=dot_precision(dtype), SOFTCAP=softcap,
    )
    compiled = triton.compile(
        ASTSource(kernel, _signature(kernel, _TRITON_DTYPE[dtype]), constexprs),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    ptx = compiled.asm["ptx"]
    registers, stack, spills = _ptxas_report(ptx, arch)
    mma = r"wgmma\.mma_async|mma\.sync" if arch >= 90 else r"mma\.sync"
    return KernelResources(
        kernel_name, arch, _TRITON_DTYPE[dtype], cfg.block_n, cfg.block_v, cfg.block_d, cfg.num_warps,
        cfg.num_stages, has_ref, softcap, compiled.metadata.shared, registers, stack, spills, len(re.findall(mma, ptx)),
    )


def all_reports(arches=(90, 80)) -> list[KernelResources]:
    from firempo_kernels.csrc_triton.configs import all_gpu_configs

    unique = dict.fromkeys(
        (kernel, cfg, dtype, arch, has_ref, softcap)
        for arch in arches
        for kernel, cfg, dtype, softcap in all_gpu_configs(arch)
        for has_ref in (True, False)
    )
    return [compile_one(*job) for job in unique]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU target")
    reports = all_reports(tuple(args.arch))
    if args.json:
        for r in reports:
            print(json.dumps({**asdict(r), "within_limits": r.within_limits}))
    else:
        print("| kernel | sm | dtype | BN x BV x BD | warps | stages | ref | cap | shared B | regs | stack B | spill B "
              "| mma ops |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in reports:
            print(f"| {r.kernel} | {r.arch} | {r.dtype} | {r.block_n}x{r.block_v}x{r.block_d} | {r.num_warps} | "
                  f"{r.num_stages} | {'y' if r.has_ref else 'n'} | {'y' if r.softcap else 'n'} | {r.shared_bytes} | "
                  f"{r.registers} | "
                  f"{r.stack_bytes} | {r.spill_bytes} | {r.tensor_core_ops} |")
    return 0 if all(r.within_limits for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
