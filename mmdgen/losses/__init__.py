"""Training losses: the independence loss (``independence``), reconstruction (``reconstruction``), the
adversarial and feature-matching losses (``adversarial``), EnCodec's gradient balancer (``balancer``), and the
LM's per-codebook cross-entropy (``lm``)."""
