"""``python -m moleflow.cli``: the ``moleflow`` command (how the dev tools start the daemon)."""

import sys

from moleflow.cli import main

sys.exit(main())
