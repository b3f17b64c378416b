"""The Triton kernels compile for Ampere and Hopper (no GPU needed) and use the hardware they should."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernels_compile_to_tensor_core_code():
    env = dict(os.environ, TRITON_INTERPRET="0")  # the interpreter replaces compilation
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tests" / "ptx_check.py")], capture_output=True, text=True,
                          env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert len(report) == 18
    for key, entry in report.items():
        arch = key.split("-")[0]
        assert entry["cubin_bytes"] > 0, key
        if "-mmd-" in key:
            assert "ex2.approx" in entry["instructions"], key  # exponentials on the special-function units
        tensor_core = "wgmma.mma_async" if arch == "sm90" else "mma.sync"
        assert tensor_core in entry["instructions"], (key, entry["instructions"])
