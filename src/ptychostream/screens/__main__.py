"""``python -m ptychostream.screens``: write or check the operator screens."""

import sys

from ptychostream.screens import main

sys.exit(main())
