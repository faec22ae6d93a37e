"""``python -m fastopt.train``: the same entry point as the ``fastopt-train`` script."""

import sys

from fastopt.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
