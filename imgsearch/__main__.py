"""`python -m imgsearch`: the same as the `imgsearch` command."""

import sys

from imgsearch.cli import main

sys.exit(main())
