"""``python -m tunnel_bench``: run the benchmark suite (see :mod:`tunnel_bench.cli`)."""

import sys

from tunnel_bench.cli import main

sys.exit(main())
