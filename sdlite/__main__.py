"""`python -m sdlite ...`: the same command line as the `sdlite` script."""

import sys

from .cli import main

sys.exit(main())
