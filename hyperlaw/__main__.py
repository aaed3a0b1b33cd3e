"""``python -m hyperlaw`` is the ``hyperlaw`` command."""

import sys

from hyperlaw.cli import main

sys.exit(main())
