"""``python -m okd.bench CONFIG [key=value ...] [options]``, the same as ``okd bench``."""

import sys

from okd.bench.cli import main

sys.exit(main())
