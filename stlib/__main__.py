"""`python -m stlib` = the `stlib` command."""

import sys

from stlib.cli import main

sys.exit(main())
