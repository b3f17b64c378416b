"""The Triton kernels compile for Ampere and Hopper (no GPU needed) and use the hardware they should."""

import json

import pytest

from mmdgen.kernels.backend import TRITON_IMPORT_ERROR
from tests.ptx_check import compile_in_subprocess


@pytest.mark.skipif(TRITON_IMPORT_ERROR is not None, reason=f"triton does not import: {TRITON_IMPORT_ERROR}")
def test_kernels_compile_to_tensor_core_code():
    report = json.loads(compile_in_subprocess("from tests.ptx_check import main; main()"))
    assert len(report) == 18
    for key, entry in report.items():
        arch = key.split("-")[0]
        assert entry["cubin_bytes"] > 0, key
        if "-mmd-" in key:
            assert "ex2.approx" in entry["instructions"], key  # exponentials on the special-function units
        tensor_core = "wgmma.mma_async" if arch == "sm90" else "mma.sync"
        assert tensor_core in entry["instructions"], (key, entry["instructions"])
