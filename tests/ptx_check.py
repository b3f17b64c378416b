"""Compile the MMD kernels for NVIDIA targets without a GPU (run with TRITON_INTERPRET=0).

Prints, as JSON, the tensor-core and exp2 instructions found in each kernel's PTX per target and dtype.
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmdgen.kernels import mmd

SCALAR_ARGS = {
    "forward": ["n", "f_dim", "stride_x", "stride_y", "shard_rank", "shard_world"],
    "gradient": ["n", "f_dim", "stride_a", "stride_b", "stride_o", "shard_rank", "shard_world"],
}


def signature(kernel, kind, dtype, constexprs):
    names = kernel.arg_names
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("coef_self", "coef_cross"):
            sig[name] = "fp32"
        elif name in SCALAR_ARGS[kind]:
            sig[name] = "i32"
        elif name in ("x_ptr", "y_ptr", "a_ptr", "b_ptr"):
            sig[name] = f"*{dtype}"
        else:
            sig[name] = "*fp32"
    return sig


def main():
    report = {}
    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            constexprs = {"NUM_BW": 6, "BLOCK": mmd.TRITON_BLOCK, "BLOCK_F": mmd.TRITON_BLOCK_F,
                          "PRECISION": "tf32x3" if dtype == "fp32" else "tf32"}
            for kind, kernel in (("forward", mmd._mmd_forward_kernel), ("gradient", mmd._mmd_gradient_kernel)):
                src = ASTSource(fn=kernel, signature=signature(kernel, kind, dtype, constexprs), constexprs=constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                ptx = compiled.asm["ptx"]
                found = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync|ex2\.approx)", ptx)))
                report[f"sm{arch}-{dtype}-{kind}"] = {"instructions": found, "cubin_bytes": len(compiled.asm["cubin"])}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
