"""mmdgen: text-to-music language models over multi-codebook audio tokens, with an
independence-promoting codec loss (MusicGen-MMD), fast on GPU and lean on CPU.

Importing ``mmdgen`` loads neither torch nor a kernel: the public names below are imported on first use.
"""

from mmdgen.version import __version__

__all__ = ["DEFAULT_BANDWIDTHS", "__version__", "independence_loss", "naive_rbf_mmd", "rbf_mmd"]
_KERNEL_NAMES = ("DEFAULT_BANDWIDTHS", "naive_rbf_mmd", "rbf_mmd")


def __getattr__(name: str):
    if name == "independence_loss":
        from mmdgen.losses.independence import independence_loss

        return independence_loss
    if name in _KERNEL_NAMES:
        from mmdgen.kernels import mmd

        return getattr(mmd, name)
    raise AttributeError(f"module 'mmdgen' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
