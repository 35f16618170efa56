"""``python -m medlens``: the same as the ``medlens`` command."""

import sys

from medlens.cli import main

sys.exit(main())
