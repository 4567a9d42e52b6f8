"""``python -m ptychostream``."""

import sys

from .cli import main

sys.exit(main())
