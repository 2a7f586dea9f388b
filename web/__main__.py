"""`python -m web`: the web gateway (see web/server.py, or `python -m web --help`)."""

import sys

from web.server import main

sys.exit(main())
