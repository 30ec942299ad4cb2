"""``python -m bench``: see :mod:`bench.cli` and ``bench/README.md``."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
