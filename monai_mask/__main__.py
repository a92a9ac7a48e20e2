"""Allow ``python -m monai_mask``."""

from __future__ import annotations

import sys

from monai_mask.cli.main import main

sys.exit(main())
