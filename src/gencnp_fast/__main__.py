"""``python -m gencnp_fast`` = the ``gencnp`` command."""

import sys

from .cli import main

sys.exit(main())
