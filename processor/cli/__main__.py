"""`python -m processor.cli`: the `guardstream` command."""

import sys

from processor.cli import main

sys.exit(main())
