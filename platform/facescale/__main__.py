"""``python -m facescale`` runs the ``facescale`` command; torchrun starts its workers this way (``-m facescale``)."""

import sys

from facescale.cli import main

if __name__ == "__main__":
    sys.exit(main())
