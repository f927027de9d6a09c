#!/usr/bin/env python3
"""The command line from a checkout: ``python cli.py prepare|train|ensemble-eval ...``.

The same as the installed ``subspectral`` command and ``python -m subspectral``; see subspectral/cli.py.
"""

import sys

from subspectral.cli import main

if __name__ == "__main__":
    sys.exit(main())
