"""``python -m stdd.askg``: see :mod:`stdd.askg.cli`."""

import sys

from .cli import main

sys.exit(main())
