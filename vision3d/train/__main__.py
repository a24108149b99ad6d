"""``python -m vision3d.train`` (what ``torchrun ... -m vision3d.train`` launches); same flags as
``vision3d train``."""

import sys

from vision3d.cli.train import main

sys.exit(main())
