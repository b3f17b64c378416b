import os

# The Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
# Set TRITON_INTERPRET=0 on a GPU machine to test the compiled kernels on CUDA instead.
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def module_folder(tmp_path_factory):
    """``module_folder(name)``: a fresh folder removed when the module's tests end. For the checkpoints at published
    widths (half a gigabyte each), which would otherwise stay on disk until the whole session ends."""
    made = []

    def make(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield make
    for folder in made:
        shutil.rmtree(folder, ignore_errors=True)
