"""``python -m ptychostream``."""

import sys

from ptychostream.cli import main

sys.exit(main())
