"""mmdgen: text-to-music language models over multi-codebook audio tokens, with an
independence-promoting codec loss (MusicGen-MMD), fast on GPU and lean on CPU."""

from mmdgen.kernels.mmd import DEFAULT_BANDWIDTHS, independence_loss, naive_rbf_mmd, rbf_mmd

__version__ = "0.1.0"
__all__ = ["DEFAULT_BANDWIDTHS", "__version__", "independence_loss", "naive_rbf_mmd", "rbf_mmd"]
