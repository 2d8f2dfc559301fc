"""``python -m tunnel_demo``: run the demo from the checkout (see :mod:`tunnel_demo.run`)."""

import sys

from tunnel_demo.run import main

sys.exit(main())
