"""``python -m prunq`` is the ``prunq`` command."""

import sys

from prunq.cli import main

sys.exit(main())
