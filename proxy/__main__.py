"""python -m proxy: the same program as the oauth-sidecar console script."""

import sys

from .cli import main

sys.exit(main())
