"""``python -m mmdgen.cli`` (how torchrun starts a command: ``torchrun --nproc-per-node 8 -m mmdgen.cli train ...``)."""

from mmdgen.cli import entry

entry()
