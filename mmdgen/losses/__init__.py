"""Training losses: the independence loss (``independence``), reconstruction (``reconstruction``), the
adversarial and feature-matching losses (``adversarial``) and EnCodec's gradient balancer (``balancer``)."""
