"""``python -m subspectral ...``: the command line."""

import sys

from subspectral.cli import main

sys.exit(main())
