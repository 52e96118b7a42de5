"""``python -m tools.cli``: the ``kvstore`` command."""

import sys

from . import main

sys.exit(main())
