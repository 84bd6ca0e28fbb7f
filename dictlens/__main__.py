"""``python -m dictlens`` (and ``torchrun -m dictlens``): the command line."""

import sys

from dictlens.cli import main

sys.exit(main())
