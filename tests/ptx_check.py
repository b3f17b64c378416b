"""Compile the Triton kernels for NVIDIA targets without a GPU (run with TRITON_INTERPRET=0).

Prints, as JSON, the tensor-core and exp2 instructions found in each kernel's PTX per target and dtype.
"""

import json
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mmdgen.kernels import mmd, vq

# kernel name -> (kernel, input pointers taking the input dtype, integer pointers, fp32 scalars, constexprs)
KERNELS = {
    "mmd-forward": (mmd._mmd_forward_kernel, {"x_ptr", "y_ptr"}, set(), set(),
                    {"NUM_BW": 6, "BLOCK": mmd.TRITON_BLOCK, "BLOCK_F": mmd.TRITON_BLOCK_F}),
    "mmd-gradient": (mmd._mmd_gradient_kernel, {"a_ptr", "b_ptr"}, set(), {"coef_self", "coef_cross"},
                     {"NUM_BW": 6, "BLOCK": mmd.TRITON_BLOCK, "BLOCK_F": mmd.TRITON_BLOCK_F}),
    "vq": (vq._nearest_codeword_kernel, {"x_ptr", "code_ptr"}, {"index_ptr"}, set(),
           {"BLOCK_N": vq.TRITON_BLOCK_N, "BLOCK_Q": vq.TRITON_BLOCK_Q, "BLOCK_D": vq.TRITON_BLOCK_D}),
}


def signature(kernel, dtype, typed, int_ptrs, floats, constexprs):
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in typed:
            sig[name] = f"*{dtype}"
        elif name in int_ptrs:
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_in_subprocess(code: str, timeout: int = 600) -> str:
    """Run Python ``code`` from the repository root with the interpreter off (it replaces compilation) and
    return its standard output; the calling test fails with the child's stderr when it does."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def main():
    report = {}
    for arch in (80, 90):
        for dtype in ("fp32", "bf16", "fp16"):
            for name, (kernel, typed, int_ptrs, floats, meta) in KERNELS.items():
                constexprs = dict(meta, PRECISION="tf32x3" if dtype == "fp32" else "tf32")
                sig = signature(kernel, dtype, typed, int_ptrs, floats, constexprs)
                compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                found = sorted(set(re.findall(r"\b(wgmma\.mma_async|mma\.sync|ex2\.approx)", compiled.asm["ptx"])))
                report[f"sm{arch}-{dtype}-{name}"] = {"instructions": found, "cubin_bytes": len(compiled.asm["cubin"])}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
