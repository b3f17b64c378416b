import os

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
# Set TRITON_INTERPRET=0 on a GPU machine to test the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")
