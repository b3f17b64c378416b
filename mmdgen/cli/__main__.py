"""``python -m mmdgen.cli`` (how torchrun starts a command: ``torchrun --nproc-per-node 8 -m mmdgen.cli train ...``)."""

import sys

from mmdgen.cli import main

sys.exit(main())
